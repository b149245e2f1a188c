"""What the weights' download and the models' loading both need, apart from both (neither
imports the other through it): the per-user folders, the errors, sha256 remembered by size and
mtime, and the records `fetch`, `check` and `list` pass around (engine/weights.py for the files,
engine/hub.py for the Stable Diffusion folders)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir, user_state_dir

APP_NAME = "blended-diffusion"
_CHUNK = 1 << 20
_HASH_CACHE = ".sha256-cache.json"


@dataclass(frozen=True)
class About:
    """A model as `list` shows it; `size` is also what the disk check counts for it."""

    what: str
    size: int  # bytes on disk once fetched
    licence: str


def models_dir() -> Path:
    override = os.environ.get("BLENDED_DIFFUSION_MODELS")
    return Path(override) if override else Path(user_data_dir(APP_NAME)) / "models"


def state_dir() -> Path:
    override = os.environ.get("BLENDED_DIFFUSION_STATE")
    return Path(override) if override else Path(user_state_dir(APP_NAME))


class MissingWeights(FileNotFoundError):
    pass


class DownloadError(OSError):
    """A download that could not finish; the message says what to do."""


class ChecksumMismatch(DownloadError):
    pass


def size_text(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _cache_path() -> Path:
    return models_dir() / _HASH_CACHE


def _read_cache() -> dict[str, dict]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _remember(path: Path, digest: str) -> None:
    st = path.stat()
    cache = _read_cache()
    cache[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    target = _cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, target)
    except OSError:
        pass  # a cache we cannot write only costs a re-hash next time


def sha256_of(path: Path) -> str:
    """The file's sha256, hashed again only when its size or mtime changed (2 GB takes a while)."""
    st = path.stat()
    hit = _read_cache().get(str(path.resolve()))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    digest = _hash_file(path)
    _remember(path, digest)
    return digest


@dataclass(frozen=True)
class Check:
    name: str  # adm256 | ... | clip | sd15 | ...
    file: str  # the file's name; a Stable Diffusion folder's hub repo
    path: Path | None
    state: str  # ok | missing | corrupt | unverified
    detail: str

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "unverified")


def skipped(status: Check) -> None:
    print(f"{status.name}: {status.file} present ({status.detail}), skipped")


@dataclass(frozen=True)
class Download:
    """A model still to fetch: the bytes to come, the folder they go to, and how."""

    name: str
    size: int
    folder: Path
    run: Callable[[], Path]
