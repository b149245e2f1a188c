"""Listing, copying and removing the installer's files and folders, never the user's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from installer.layout import LIB

SKIP = {"__pycache__", ".DS_Store", LIB}  # never copied from a source tree


def safe_rel(rel: str) -> bool:
    """A recorded path stays inside the host's folder (a damaged manifest must not reach out)."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and ":" not in rel


def tree(folder: Path, prefix: str) -> dict[str, Path]:
    """Every file under `folder` as {prefix/relative path: source}, minus caches."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not SKIP.intersection(rel.parts) and path.suffix != ".pyc":
            files[f"{prefix}/{rel.as_posix()}"] = path
    return files


def ancestors(rel: str) -> list[str]:
    return [p.as_posix() for p in PurePosixPath(rel).parents if p.as_posix() != "."]


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def remove_empty(dirs: list[str] | list[Path]) -> None:
    for d in sorted((Path(x) for x in dirs), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty (the user's files) or already gone: leave it


def _drop_bytecode(folder: Path) -> None:
    """The host compiles our files into __pycache__: that is ours to remove too."""
    cache = folder / "__pycache__"
    if cache.is_dir() and all(f.suffix == ".pyc" for f in cache.iterdir()):
        shutil.rmtree(cache)


def prune(root: Path, dirs: set[str]) -> None:
    """Remove the folders `dirs` under `root` (with the host's bytecode) where they are empty."""
    for d in dirs:
        if (root / d).is_dir():
            _drop_bytecode(root / d)
    remove_empty([root / d for d in dirs])


def write_files(root: Path, files: dict[str, Path], executable: set[str]) -> None:
    for rel, src in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        mode = 0o755 if rel in executable or os.stat(src).st_mode & 0o111 else 0o644
        os.chmod(dst, mode)
