"""Install the Blended Diffusion engine and its Krita and GIMP 3 plug-ins.

    python install.py                   engine venv (.venv), both plug-ins, the weights
    python install.py --plugins-only    only the plug-ins (the engine runs on another machine)
    python install.py --weights-only    only the weights (resumes a broken download)
    python install.py --models sd15,sd21-base,adm256,adm512
                                        these models (default: sd15,adm256; CLIP always comes)
    python install.py --list-models     every model: installed or not, size, licence
    python install.py --remove-model sd21-base   deletes a model's files
    python install.py --uninstall       removes the plug-ins it installed, nothing else
    python install.py --dry-run         prints the plan, changes nothing
    python install.py --cluster         with Ray Serve, for `serve --cluster` (several GPUs/boxes)

The plug-ins talk to the engine over ZeroMQ, so each host's Python needs pyzmq, which no Krita or
GIMP build ships. Where the host's Python already has it (Linux: the system python3, checked with
`python3 -c "import zmq"`), nothing is added; otherwise the matching pyzmq wheel is downloaded with
pip and unpacked into the plug-in's `_lib` folder. Assumed hosts' Pythons: Linux the system
python3; Windows and macOS Krita 5.2's bundled 3.10 and GIMP 3's bundled 3.12. Override them with
--host-python / --krita-python / --gimp-python X.Y (or `system`: the host's Python has pyzmq) and
--platform TAG (pip platform tags, e.g. win_amd64, manylinux_2_28_x86_64,
macosx_11_0_universal2), e.g. for a Krita AppImage (bundled 3.10) or a Flatpak GIMP.

Standard library only: this runs before the engine's venv exists (Python 3.10+).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from installer import ROOT
from installer.console import InstallError, say, step, warn
from installer.layout import HOME_ENV, LAYOUTS, Host, current_layout, hosts_for, layout_for
from installer.plugins import install_plugins, uninstall_plugins
from installer.pyzmq import PyzmqSupply
from installer.torch_build import DEVICE_KINDS
from installer.venv import install_engine, venv_python
from installer.weights import (
    DEFAULT_MODELS,
    fetch_weights,
    list_models,
    models_dir,
    remove_models,
)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("takes model names separated by commas")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python install.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plugins-only", action="store_true", help="only the Krita/GIMP plug-ins")
    mode.add_argument("--weights-only", action="store_true", help="only the weights")
    mode.add_argument("--uninstall", action="store_true", help="remove the installed plug-ins")
    mode.add_argument("--list-models", action="store_true",
                      help="the models: installed or not, size, licence")  # fmt: skip
    mode.add_argument("--remove-model", type=_names, metavar="NAME[,NAME]",
                      help="delete these models' files")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--no-weights", action="store_true", help="skip the weights (CI)")
    p.add_argument("--models", type=_names, metavar="NAME[,NAME]",
                   help=f"the models to fetch (default: {','.join(DEFAULT_MODELS)}; "
                   "--list-models names them); CLIP always comes")  # fmt: skip
    p.add_argument("--with-512", action="store_true", help="deprecated: --models ...,adm512")
    p.add_argument("--dev", action="store_true", help="pip install -e '.[dev]' (tests, ruff, Ray)")
    p.add_argument("--cluster", action="store_true", help="Ray Serve, for `serve --cluster`")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv", help="default: .venv here")
    p.add_argument("--torch-index", metavar="URL", help="extra pip index for torch's wheels")
    p.add_argument("--device-kind", choices=DEVICE_KINDS, default="auto",
                   help="the GPU to install torch for (default: the one found)")  # fmt: skip
    g = p.add_argument_group("plug-in folders")
    g.add_argument("--krita-dir", type=Path, metavar="DIR", help="Krita's pykrita folder")
    g.add_argument("--gimp-dir", type=Path, metavar="DIR", help="GIMP 3's plug-ins folder")
    g.add_argument("--no-krita", action="store_true", help="leave Krita alone")
    g.add_argument("--no-gimp", action="store_true", help="leave GIMP alone")
    g.add_argument("--platform-layout", choices=LAYOUTS, default=current_layout())
    g.add_argument("--home", type=Path, default=Path(os.environ.get(HOME_ENV) or Path.home()),
                   help=f"the user's home (default: ${HOME_ENV} or ~)")  # fmt: skip
    g.add_argument("--source", type=Path, default=ROOT, help="checkout to install from")
    z = p.add_argument_group("pyzmq for the hosts' Python (X.Y, or `system`: it has pyzmq)")
    z.add_argument("--host-python", metavar="X.Y", help="both hosts' Python")
    z.add_argument("--krita-python", metavar="X.Y", help="Krita's Python")
    z.add_argument("--gimp-python", metavar="X.Y", help="GIMP's Python")
    z.add_argument("--platform", action="append", metavar="TAG", help="pip platform tag (repeat)")
    z.add_argument("--pyzmq-wheel", type=Path, metavar="FILE", help="use this wheel, no download")
    args = p.parse_args(argv)
    for name in ("host_python", "krita_python", "gimp_python"):
        value = getattr(args, name)
        if value and value != "system" and not re.fullmatch(r"3\.\d+", value):
            p.error(f"--{name.replace('_', '-')} takes X.Y (e.g. 3.10) or `system`, not {value!r}")
    if args.weights_only and args.no_weights:
        p.error("--weights-only and --no-weights contradict each other")
    if args.with_512:
        warn("--with-512 is deprecated: name adm512 in --models (it is added to them)")
        args.models = [*(args.models or DEFAULT_MODELS), "adm512"]
    fetches = not (args.no_weights or args.plugins_only or args.uninstall or args.list_models)
    if args.models and not (fetches and args.remove_model is None):
        p.error("--models names the models to fetch: this run fetches none")
    if args.pyzmq_wheel and not args.pyzmq_wheel.is_file():
        p.error(f"--pyzmq-wheel: {args.pyzmq_wheel} is not a file")
    args.home, args.source = args.home.expanduser(), args.source.resolve()
    return args


def summary(
    dry: bool,
    python: Path,
    hosts: list[Host],
    kritarc: Path,
    parts: tuple[bool, bool, bool],
    device_warning: str | None,
    fetched: bool = True,
) -> None:
    """What to run next and where things went; `parts`: (engine, plug-ins, weights) installed;
    `fetched`: False when some models could not be fetched (said after this)."""
    engine, plugins, weights = parts
    step("dry run: nothing was changed" if dry else "done" if fetched else "done, but see below")

    def row(label: str, value: str) -> None:
        say(f"    {label + ':':<20}{value}")

    if engine or weights:
        row("start the engine", f"{python} -m engine serve")
        row("check everything", f"{python} -m engine doctor")
    elif plugins:
        row("start the engine", "python -m engine serve, where the engine runs")
    if plugins:
        for host in hosts:
            extra = f" (enabled in {kritarc})" if host.key == "krita" else ""
            row(f"{host.label} plug-in", f"{host.folder}{extra}; restart {host.label}")
    if weights:
        row("model weights", models_dir(python))
    if engine and device_warning:  # the last thing said: a GPU the engine will not use
        say(f"    warning: {device_warning}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = not (args.plugins_only or args.weights_only or args.uninstall)
    plugins = not (args.weights_only or args.uninstall)
    weights = not (args.plugins_only or args.no_weights or args.uninstall)
    layout = layout_for(args.platform_layout, args.home)
    hosts = hosts_for(layout, args.krita_dir, args.gimp_dir)
    hosts = [h for h in hosts if not getattr(args, f"no_{h.key}")]
    python = venv_python(args.venv)
    try:
        if args.list_models:
            list_models(python, args.venv)
            return 0
        if args.remove_model:
            remove_models(python, args.venv, args.remove_model, args.dry_run)
            return 0
        if args.uninstall:
            uninstall_plugins(hosts, args.dry_run)
            step("kept")
            say(f"    the engine venv ({args.venv}): delete it by hand; the models: "
                "--remove-model NAME (--list-models names them)")  # fmt: skip
            return 0
        device_warning = install_engine(args, python) if engine else None
        if plugins:
            with tempfile.TemporaryDirectory(prefix="bd-install-") as tmp:
                supply = PyzmqSupply(args, Path(tmp), python)
                install_plugins(hosts, layout.kritarc, args.source, supply, args.dry_run)
        missing = None  # models not fetched (offline): said last, the rest installed
        if weights:
            try:
                fetch_weights(python, args.venv, args.models, args.dry_run)
            except InstallError as e:
                missing = e
        parts = (engine, plugins, weights)
        summary(args.dry_run, python, hosts, layout.kritarc, parts, device_warning, not missing)
        if missing:
            raise missing
    except (InstallError, OSError) as e:  # a step that failed: its reason, not a traceback
        print(f"install.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("install.py: interrupted", file=sys.stderr)
        return 130
    return 0
