"""The plug-ins into each host's folder: their own files, the shared client they import (the
top of engine/ and engine/shared/) and pyzmq where needed, all in `_lib`; a manifest of what
was installed, so an update drops what the source no longer has and an uninstall removes exactly
that."""

from __future__ import annotations

import json
import time
from pathlib import Path

from installer.console import InstallError, say, step, warn, would
from installer.files import (
    ancestors,
    missing_dirs,
    prune,
    remove_empty,
    safe_rel,
    tree,
    write_files,
)
from installer.kritarc import KRITA_KEY, KRITA_SECTION, disable_in_kritarc, enable_in_kritarc
from installer.layout import LIB, MANIFEST, PLUGIN, Host
from installer.pyzmq import PyzmqSupply

MANIFEST_FORMAT = 1
# engine/ files the plug-ins import: the package top and engine/shared/ (wire, client, core)
CLIENT_FILES = ("__init__.py",)
CORE = "shared"


def read_manifest(path: Path) -> dict | None:
    """An install record written by this installer, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def plugin_files(key: str, source: Path) -> dict[str, Path]:
    """The plug-in's own files, by path relative to the host's plug-in folder."""
    if key == "krita":
        base = source / "plugin_krita"
        desktop, package = base / f"{PLUGIN}.desktop", base / PLUGIN
        if not desktop.is_file() or not package.is_dir():
            raise InstallError(
                f"the Krita plug-in is missing from {base}: expected {desktop.name} and {PLUGIN}/"
            )
        return {desktop.name: desktop, **tree(package, PLUGIN)}
    base = source / "plugin_gimp" / PLUGIN
    if not (base / f"{PLUGIN}.py").is_file():
        raise InstallError(f"the GIMP plug-in is missing: expected {base / (PLUGIN + '.py')}")
    return tree(base, PLUGIN)


def client_files(source: Path) -> dict[str, Path]:
    """The shared pure-Python client and core, as `_lib/engine/...` of each plug-in."""
    files = {}
    core = sorted(p.relative_to(source / "engine").as_posix()
                  for p in (source / "engine" / CORE).glob("*.py"))  # fmt: skip
    for name in (*CLIENT_FILES, *core):
        path = source / "engine" / name
        if path.is_file():
            files[f"{PLUGIN}/{LIB}/engine/{name}"] = path
        else:
            warn(f"{path} does not exist (yet): the plug-ins get no copy of it")
    return files


def install_plugins(
    hosts: list[Host], kritarc: Path, source: Path, supply: PyzmqSupply, dry: bool
) -> None:
    shared = client_files(source)
    for host in hosts:
        step(f"{host.label} plug-in: {host.folder}")
        files = {**plugin_files(host.key, source), **shared}
        python = supply.host_python(host)
        say(f"    pyzmq: {python.why}")
        if dry and python.version:
            would(dry, f"add pyzmq for Python {python.version} ({python.platforms[0]})")
            zmq_files, wheel = {}, None
        else:
            zmq_files, wheel = supply.files(python)
            if wheel:
                say(f"    pyzmq: {wheel} unpacked into {LIB}/")
        files.update(zmq_files)
        pyzmq = {"bundled": wheel is not None, "wheel": wheel, "python": python.version}
        pyzmq |= {"platforms": list(python.platforms), "why": python.why}
        rc = kritarc if host.key == "krita" else None
        install_host(host, files, pyzmq, rc, source, dry)


def install_host(
    host: Host, files: dict[str, Path], pyzmq: dict, kritarc: Path | None, source: Path, dry: bool
) -> None:
    """Copy the files in, drop what an older install had and this one has not, record it."""
    old = read_manifest(host.manifest) or {}
    new = set(files) | {f"{PLUGIN}/{LIB}/{MANIFEST}"}
    stale = {r for r in old.get("files", []) if safe_rel(r)} - new
    removed = f", remove {len(stale)} old ones" if stale else ""
    would(dry, f"{'update' if old else 'install'} {len(new)} files{removed}")
    if kritarc:
        would(dry, f"enable it in {kritarc} ({KRITA_SECTION} {KRITA_KEY}=true)")
    if dry:
        return
    needed = {d for rel in new for d in ancestors(rel)}
    dirs = {d for d in needed if not (host.root / d).exists()}  # this run creates them
    dirs |= {d for d in old.get("dirs", []) if (host.root / d).is_dir()}
    parents = old.get("parents") or [str(p) for p in missing_dirs(host.root)]
    write_files(host.root, files, {f"{PLUGIN}/{PLUGIN}.py"} if host.key == "gimp" else set())
    for rel in stale:
        (host.root / rel).unlink(missing_ok=True)
    prune(host.root, dirs - needed)
    manifest = {
        "format": MANIFEST_FORMAT,
        "host": host.key,
        "root": str(host.root),
        "installed": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source": str(source),
        "files": sorted(new),
        "dirs": sorted(d for d in dirs if (host.root / d).is_dir()),
        "parents": parents,
        "pyzmq": pyzmq,
        "kritarc": enable_in_kritarc(kritarc, old.get("kritarc")) if kritarc else None,
    }
    host.manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def remove_install(host: Host, manifest: dict) -> list[str]:
    """Delete what a manifest lists (files, then the folders the install created); returns the
    outer folders it created, which another host's install may still share (~/.config)."""
    for rel in manifest.get("files", []):
        if safe_rel(rel):
            (host.root / rel).unlink(missing_ok=True)
    prune(host.root, {d for d in manifest.get("dirs", []) if safe_rel(d)})
    parents = list(manifest.get("parents", []))
    if manifest.get("kritarc"):
        disable_in_kritarc(manifest["kritarc"])
        parents += manifest["kritarc"].get("parents", [])
    remove_empty(parents)
    return parents


def uninstall_plugins(hosts: list[Host], dry: bool) -> None:
    parents: list[str] = []
    for host in hosts:
        step(f"{host.label} plug-in: removing {host.folder}")
        manifest = read_manifest(host.manifest)
        if manifest is None:
            say(f"    nothing installed by install.py there ({host.manifest} not found)")
            continue
        kritarc = manifest.get("kritarc")
        would(dry, f"remove {len(manifest.get('files', []))} files it installed")
        if kritarc:
            would(dry, f"remove {KRITA_KEY} from {kritarc['path']}")
        if not dry:
            parents += remove_install(host, manifest)
    remove_empty(parents)  # once the last host left a shared folder empty
