"""`python -m engine doctor`: what is installed, where, and whether it works.

Versions, the device, the weight files (sha256 checked, remembered by size and mtime so a 2 GB
file is hashed once), the plug-ins install.py put into Krita and GIMP (their manifests), pyzmq in
each host's Python, and whether an engine answers at the endpoint. Exits 1 when something the
engine or a plug-in needs is missing or damaged; an engine that is not running is not an error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

from engine import __version__, weights

# The installer (install.py's package, standard library only) knows where the plug-ins go and
# which GPUs torch can drive: ask it, never copy it. It lives in the checkout beside engine/ and
# is not part of the engine's distribution, so the checkout goes first on the path here, also
# when the doctor runs from another folder; an engine installed without its checkout has none.
CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "installer" / "__init__.py").is_file() and str(CHECKOUT) not in sys.path:
    sys.path.insert(0, str(CHECKOUT))
try:
    import installer.kritarc
    import installer.layout
    import installer.plugins
    import installer.pyzmq
    import installer.torch_build
except ImportError:
    installer = None

ENDPOINT_ENV = "BLENDED_DIFFUSION_ENDPOINT"


class Report:
    def __init__(self) -> None:
        self.problems = 0

    def section(self, title: str) -> None:
        print(title, flush=True)

    def line(self, label: str, text: str, problem: bool = False) -> None:
        print(f"{'!' if problem else ' '} {label:<16} {text}", flush=True)
        self.problems += problem


def package_version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    for dist in importlib.metadata.packages_distributions().get(module, []):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if dist.replace("-", "_") == module else f"{version} ({dist})"
    return "installed (version unknown)"


def versions(report: Report) -> None:
    report.section("versions")
    report.line("python", f"{platform.python_version()} ({sys.executable})")
    report.line("engine", __version__)
    for module in ("torch", "open_clip", "guided_diffusion"):
        version = package_version(module)
        report.line(module, version, problem=version == "not installed")
    try:
        import zmq

        report.line("pyzmq", f"{zmq.pyzmq_version()} (libzmq {zmq.zmq_version()})")
    except ImportError:
        report.line("pyzmq", "not installed", problem=True)


def device(report: Report) -> None:
    """The device the engine will use, why each other kind is not used, and the GPUs install.py
    finds in the machine: a GPU the engine cannot use is a problem, with the command that fixes
    it."""
    report.section("device")
    try:
        from engine import devices
    except ImportError:
        report.line("device", "unknown: torch is not installed", problem=True)
        return
    import torch

    chosen = devices.resolve("auto")
    gpus = ", ".join(devices.names(chosen))
    report.line(
        "device",
        f"{devices.LABELS[chosen.type]}{f': {gpus}' if gpus else ''} (torch {devices.build()})",
    )
    order = devices.KINDS.index(chosen.type)
    for kind, ok, why in devices.explain():
        if kind in ("cpu", chosen.type):
            continue
        if not ok:
            text = why
        elif devices.KINDS.index(kind) > order:
            text = f"available; {chosen.type} comes first"
        else:
            text = "available, but it lacks an operation the engine needs (said above)"
        report.line(f"  {kind}", text)
    found = installer.torch_build.find_gpus() if installer else []
    if found:
        plan = installer.torch_build.plan_torch(installer.layout.current_layout(), found)
        names = "; ".join(g.describe() for g in found)
        if chosen.type == "cpu" and plan.kind != "cpu":
            fix = f"fix with `python install.py --device-kind {plan.kind}`"
            report.line("GPUs", f"{names}: the engine cannot use it; {fix}", problem=True)
        else:
            report.line("GPUs", f"{names}{f' ({plan.warning})' if plan.warning else ''}")
    elif installer:
        report.line("GPUs", "none found (" + ", ".join(installer.torch_build.GPU_PROBES) + ")")
    report.line("threads", f"torch uses {torch.get_num_threads()} of {os.cpu_count()} CPU threads")


def weight_files(report: Report) -> None:
    report.section(f"weights (models folder {weights.models_dir()})")
    for name in weights.names():
        c = weights.check(name)
        required = name in weights.REQUIRED
        text = f"{c.state}: {c.path or c.file} ({c.detail})"
        if c.state == "missing":
            how = weights.DOWNLOAD_COMMAND + ("" if required else f" --models {name}")
            text += f", {'needed' if required else 'optional'}: `{how}`"
        report.line(name, text, problem=c.state == "corrupt" or (required and not c.ok))


def _kritarc_enabled(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    sec = installer.kritarc.section_span(lines)
    i = installer.kritarc.key_line(lines, *sec) if sec else None
    return i is not None and lines[i].split("=", 1)[1].strip().lower() == "true"


def _import_zmq_from(python: str, lib: Path) -> str:
    code = "import sys; sys.path.insert(0, sys.argv[1]); import zmq; print(zmq.__file__)"
    try:
        r = subprocess.run(
            [python, "-I", "-c", code, str(lib)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not run {python}: {e}"
    if r.returncode:
        return f"{python} cannot import it: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    inside = Path(r.stdout.strip()).resolve().is_relative_to(lib.resolve())
    return "" if inside else f"{python} imported another zmq ({r.stdout.strip()})"


def host_pyzmq(report: Report, host: installer.layout.Host, manifest: dict, local: bool) -> None:
    """Can the host's Python import zmq: from the plug-in's `_lib`, or its own?"""
    info = manifest.get("pyzmq") or {}
    lib = host.folder / installer.layout.LIB
    linux = local and sys.platform.startswith("linux")
    system = installer.pyzmq.system_python3() if linux else None
    if info.get("bundled"):
        where = f"{info.get('wheel')} in {lib}"
        if not (lib / "zmq" / "__init__.py").is_file():
            report.line("  pyzmq", f"{where} is missing: run install.py again", problem=True)
            return
        version = installer.pyzmq.probe_python(system)[0] if system else None
        if version != info.get("python"):
            report.line("  pyzmq", f"{where} (for Python {info.get('python')}; not testable here)")
            return
        error = _import_zmq_from(system, lib)
        report.line("  pyzmq", f"{where}: {error or f'{system} imports it'}", problem=bool(error))
    elif system:
        version, has_zmq = installer.pyzmq.probe_python(system)
        if has_zmq:
            report.line("  pyzmq", f"{system} ({version}) imports zmq")
        else:
            text = f"{system} ({version}) cannot import zmq: run install.py again"
            report.line("  pyzmq", text, problem=True)
    else:
        report.line("  pyzmq", f"the host's own ({info.get('why', 'as installed')})")


def plugins(report: Report, args: argparse.Namespace) -> None:
    report.section("plug-ins")
    if installer is None:
        report.line("plug-ins", f"cannot tell: no installer in {CHECKOUT} (not a checkout)")
        return
    layout = installer.layout.layout_for(args.platform_layout, args.home)
    local = args.platform_layout == installer.layout.current_layout()
    for host in installer.layout.hosts_for(layout, args.krita_dir, args.gimp_dir):
        manifest = installer.plugins.read_manifest(host.manifest)
        if manifest is None:
            report.line(host.label, f"not installed (looked in {host.folder})")
            continue
        missing = [r for r in manifest.get("files", []) if not (host.root / r).is_file()]
        text = f"{host.folder} (installed {manifest.get('installed', '?')})"
        if missing:
            text += f": {len(missing)} installed file(s) missing, e.g. {missing[0]}; reinstall"
        report.line(host.label, text, problem=bool(missing))
        if manifest.get("kritarc"):
            path = Path(manifest["kritarc"]["path"])
            enabled = _kritarc_enabled(path)
            state = "enabled" if enabled else "NOT enabled (Settings > Python Plugin Manager)"
            report.line("  kritarc", f"{state} in {path}")
        host_pyzmq(report, host, manifest, local)


def engine(report: Report, endpoint: str, timeout: float, keys: Path | None) -> None:
    report.section("engine")
    if importlib.util.find_spec("engine.shared.client") is None:
        report.line("engine", f"{endpoint}: engine.shared.client is not available, cannot ask")
        return
    from engine.shared.client import Client, EngineUnreachable, load_keys

    try:
        with Client(endpoint, timeout=timeout, **(load_keys(keys) if keys else {})) as client:
            info = client.hello()
    except Exception as e:  # whatever stops the hello, the doctor reports it and goes on
        why = "" if isinstance(e, EngineUnreachable) else f" ({e})"
        text = f"no engine answering at {endpoint} within {timeout:g} s{why}"
        report.line("engine", f"{text}: start one with `python -m engine serve`")
        return
    shown = {k: info[k] for k in ("engine", "default", "device", "queue") if k in info}
    served = [m["name"] + (" (cannot serve)" if m.get("error") else "")
              for m in info.get("available", [])]  # fmt: skip
    shown["serving"] = "; ".join(served) or info.get("models", "?")
    report.line(
        "engine", f"answering at {endpoint}: " + ", ".join(f"{k} {v}" for k, v in shown.items())
    )


def default_endpoint() -> str:
    try:
        from engine.shared.client import DEFAULT_ENDPOINT
    except ImportError:  # no client (or no pyzmq): the engine's documented default
        return "tcp://127.0.0.1:5557"
    return DEFAULT_ENDPOINT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint", help=f"the engine's address (default ${ENDPOINT_ENV}, else the client's)"
    )
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for its hello")
    p.add_argument("--keys", type=Path, help="client key folder, for a CURVE engine")
    p.add_argument("--home", type=Path, help="the user's home, as for install.py")
    p.add_argument("--platform-layout", choices=("linux", "windows", "macos"))
    p.add_argument("--krita-dir", type=Path, help="Krita's pykrita folder, as for install.py")
    p.add_argument("--gimp-dir", type=Path, help="GIMP 3's plug-ins folder, as for install.py")


def run(args: argparse.Namespace) -> int:
    if args.home is None:
        args.home = Path(os.environ.get("BLENDED_DIFFUSION_HOME") or Path.home())
    if args.platform_layout is None and installer is not None:
        args.platform_layout = installer.layout.current_layout()
    args.endpoint = args.endpoint or os.environ.get(ENDPOINT_ENV) or default_endpoint()
    report = Report()
    versions(report)
    device(report)
    weight_files(report)
    plugins(report, args)
    engine(report, args.endpoint, args.timeout, args.keys)
    print(f"{report.problems} problem(s) found" if report.problems else "no problems found")
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.doctor", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
