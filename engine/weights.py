"""Where model weights live, which files the named models need, and how they get there.

One per-user folder (platformdirs) holds every ADM checkpoint and the Stable Diffusion folders
(engine/hub.py fetches those); `BLENDED_DIFFUSION_MODELS` overrides it (tests, portable installs).
The ADM files come by plain HTTP(S) from their official addresses (`BLENDED_DIFFUSION_WEIGHTS_URL`
replaces the folder they are fetched from: mirrors, tests), resumed with Range requests into
`NAME.partial` and moved to their final name only once their sha256 matches. OpenAI's CLIP comes
through huggingface_hub into its own cache, where open_clip looks for it (`HF_ENDPOINT` and
`HF_HUB_CACHE` move that hub and that cache).
The engine's own state (the step times it measured) is in the per-user state folder, named here
with the models folder; `BLENDED_DIFFUSION_STATE` overrides it (tests).

Before downloading, `fetch` adds up what is still to come on each disk and refuses to start when
a disk lacks the room; a name it cannot fetch (no network) is said at the end, the others fetched.

    python -m engine.weights fetch [NAME ...]   (default: adm256 clip; `list` names them all)
    python -m engine.weights check [NAME ...]
    python -m engine.weights list               names, sizes, licences, what is installed
    python -m engine.weights remove NAME ...
    python -m engine.weights where
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engine.weight_files import (
    _CHUNK,
    _hash_file,
    _remember,
    models_dir,
    sha256_of,
    size_text,
    skipped,
)
from engine.weight_files import APP_NAME as APP_NAME
from engine.weight_files import About as About
from engine.weight_files import Check as Check
from engine.weight_files import ChecksumMismatch as ChecksumMismatch
from engine.weight_files import Download as Download
from engine.weight_files import DownloadError as DownloadError
from engine.weight_files import MissingWeights as MissingWeights
from engine.weight_files import state_dir as state_dir

DOWNLOAD_COMMAND = "python install.py --weights-only"
URL_ENV = "BLENDED_DIFFUSION_WEIGHTS_URL"


@dataclass(frozen=True)
class WeightFile:
    name: str
    url: str
    sha256: str | None  # None: not published; recorded on first verified download
    about: About


ADM_LICENCE = "MIT (openai/guided-diffusion)"
# sizes: the parameter counts in fp32, rounded up
ADM256 = WeightFile(
    "256x256_diffusion_uncond.pt",
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    "983e3de6f95c88c81b2ca7ebb2c217933be1973b1ff058776b970f901584613a",
    About("ADM 256x256 unconditional: the pixel method, the paper's", 2_220_000_000, ADM_LICENCE),
)
ADM512 = WeightFile(
    "512x512_diffusion.pt",
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/512x512_diffusion.pt",
    None,
    About("ADM 512x512 class-conditional: the pixel method at 512", 2_250_000_000, ADM_LICENCE),
)
# Katherine Crowson's unconditional fine-tune (Disco Diffusion's 512 model); no model uses it yet.
ADM512_UNCOND = WeightFile(
    "512x512_diffusion_uncond_finetune_008100.pt",
    "https://v-diffusion.s3.us-west-2.amazonaws.com/512x512_diffusion_uncond_finetune_008100.pt",
    "9c111ab89e214862b76e1fa6a1b3f1d329b1a88281885943d2cdbe357ad57648",
    About(
        "ADM 512x512 unconditional fine-tune (Disco Diffusion's); no model uses it yet",
        2_250_000_000, "not stated by its author",
    ),
)  # fmt: skip

# OpenAI's CLIP ViT-B/16 where open_clip's `ViT-B-16-quickgelu` / `openai` tag fetches it.
CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"
CLIP_FILE = "open_clip_model.safetensors"
CLIP = "clip"
CLIP_ABOUT = About(
    "OpenAI CLIP ViT-B/16: ranks every real model's results", 600_000_000, "MIT (openai/CLIP)"
)

FILES = {"adm256": ADM256, "adm512": ADM512, "adm512-uncond": ADM512_UNCOND}
REQUIRED = ("adm256", CLIP)  # what `--model adm256`, the default real model, needs
NAMES = (*FILES, CLIP)  # the files; names() adds the Stable Diffusion folders

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_RETRY_HTTP = {408, 429, 500, 502, 503, 504}


def names() -> tuple[str, ...]:
    """Every name `fetch` takes: the files and the Stable Diffusion folders."""
    from engine.latent_models import KNOWN  # it imports this module: read when asked

    return (*NAMES, *KNOWN)


def about(name: str) -> About:
    if name in FILES:
        return FILES[name].about
    if name == CLIP:
        return CLIP_ABOUT
    from engine import hub  # it imports this module (and torch): read when asked

    return hub.ABOUT[name]


def locate(weight: WeightFile) -> Path:
    """The path of a known weight file, or an error that says how to get it."""
    path = models_dir() / weight.name
    if not path.is_file():
        raise MissingWeights(
            f"weight file {weight.name} ({size_text(weight.about.size)}) is missing: looked for "
            f"{path}. Download it with `{DOWNLOAD_COMMAND}`, or pass --unet-checkpoint PATH."
        )
    return path


def weight_url(weight: WeightFile) -> str:
    base = os.environ.get(URL_ENV)
    return f"{base.rstrip('/')}/{weight.name}" if base else weight.url


# -- sha256, remembered by size and mtime ---------------------------------------------------


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: Path) -> str | None:
    """The hash written next to a file whose sha256 is not published (first verified download)."""
    try:
        digest = _record_path(path).read_text().split()[0].lower()
    except (OSError, IndexError):
        return None
    return digest if _SHA256.match(digest) else None


def expected_sha256(weight: WeightFile) -> str | None:
    return weight.sha256 or recorded_sha256(models_dir() / weight.name)


# -- HTTP download with resume ---------------------------------------------------------------


def _content_range(header: str | None) -> tuple[int, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header or "")
    if not m:
        raise DownloadError(f"unreadable Content-Range {header!r}")
    return int(m[1]), None if m[2] == "*" else int(m[2])


def _partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def _transfer(url: str, partial: Path, timeout: float, progress: bool) -> None:
    """One request: append the rest of `url` to `partial`; raises when the transfer breaks."""
    from tqdm import tqdm

    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": f"{APP_NAME}-installer", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is whole (or wrong)
            return
        raise
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"{url}: asked to resume at byte {have}, got byte {start}")
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
        with (
            open(partial, mode) as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=partial.name.removesuffix(".partial"),
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            while block := response.read(_CHUNK):
                f.write(block)
                bar.update(len(block))
    size = partial.stat().st_size
    if total is not None and size < total:
        raise DownloadError(f"the connection closed at byte {size} of {total}")


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    *,
    attempts: int = 4,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Fetch `url` to `dest` through `dest.partial`, resuming broken transfers; returns the sha256.

    Nothing appears under `dest` unless the whole file arrived and (when `sha256` is given) its
    hash matches. A transfer that keeps breaking leaves the partial file for the next run.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(dest)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, partial, timeout, progress)
            break
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code not in _RETRY_HTTP:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            kept = partial.stat().st_size if partial.exists() else 0
            if attempt == attempts:
                raise DownloadError(
                    f"{dest.name}: the download broke off ({e}) {attempts} times; {kept} bytes "
                    f"are kept in {partial}: run the same command again to resume"
                ) from e
            print(
                f"{dest.name}: transfer broke off at byte {kept} ({e}); resuming", file=sys.stderr
            )
            time.sleep(retry_wait * attempt)
    digest = _hash_file(partial)
    if sha256 and digest != sha256:
        partial.unlink()  # resuming a wrong file can never make it right
        raise ChecksumMismatch(
            f"{dest.name}: sha256 mismatch: the download from {url} hashes to {digest}, "
            f"expected {sha256}. It was deleted and nothing was saved as {dest}; try again, "
            f"or check the address (${URL_ENV} overrides it)."
        )
    os.replace(partial, dest)
    _remember(dest, digest)
    return digest


# -- the named files -------------------------------------------------------------------------


def clip_cached_path() -> Path | None:
    """OpenAI's CLIP in huggingface_hub's cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(CLIP_REPO, CLIP_FILE)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _hub_sha256(path: Path) -> str | None:
    """The hub names an LFS blob by its sha256 (the ETag): the expected hash, when it is one."""
    blob = Path(os.path.realpath(path)).name
    return blob if _SHA256.match(blob) else None


def _verify(name: str, file: str, path: Path, expected: str | None, what: str) -> Check:
    if expected is None:
        return Check(name, file, path, "unverified", f"present, {what}")
    digest = sha256_of(path)
    if digest != expected:
        return Check(name, file, path, "corrupt", f"sha256 {digest[:12]}..., expected {expected}")
    return Check(name, file, path, "ok", "sha256 verified")


def check(name: str) -> Check:
    """Is the named model present, and do its sha256s match (where they are known)?"""
    if name == CLIP:
        path = clip_cached_path()
        if path is None:
            return Check(name, CLIP_FILE, None, "missing", f"{CLIP_REPO} not in the hub cache")
        return _verify(name, CLIP_FILE, path, _hub_sha256(path), "the hub gave no sha256")
    if name not in FILES:
        from engine import hub

        return hub.check(name)
    weight = FILES[name]
    path = models_dir() / weight.name
    if not path.is_file():
        size = size_text(weight.about.size)
        return Check(name, weight.name, path, "missing", f"{size}, not downloaded")
    return _verify(
        name, weight.name, path, expected_sha256(weight), "no published sha256 and none recorded"
    )


def _fetch_clip(progress: bool) -> Path:
    status = check(CLIP)
    if status.ok:
        skipped(status)
        return status.path
    if status.state == "corrupt":
        print(
            f"{CLIP}: {CLIP_FILE} in the hub cache is damaged ({status.detail}): fetching it again"
        )
        _remove_hub_file(status.path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()

    print(f"{CLIP}: fetching {CLIP_REPO}/{CLIP_FILE} through huggingface_hub")
    try:
        path = Path(hf_hub_download(CLIP_REPO, CLIP_FILE))
    except Exception as e:  # the hub's own errors (HTTP, offline, metadata) become one message
        raise DownloadError(f"{CLIP_FILE} from {CLIP_REPO}: {e}") from e
    expected = _hub_sha256(path)
    if expected and (digest := sha256_of(path)) != expected:
        _remove_hub_file(path)
        raise ChecksumMismatch(
            f"{CLIP_FILE}: sha256 mismatch: the hub's file hashes to {digest}, expected {expected}"
            " (its ETag). It was removed from the cache; try again."
        )
    print(f"{CLIP}: {path}" + (" (sha256 verified)" if expected else ""))
    return path


def _remove_hub_file(path: Path) -> None:
    blob = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def fetch(name: str, *, progress: bool = True, attempts: int = 4, retry_wait: float = 2.0) -> Path:
    """Make the named model present and valid: skip it when it is, download it when not."""
    if name == CLIP:
        return _fetch_clip(progress)
    if name not in FILES:
        from engine import hub

        return hub.fetch(name, progress=progress)
    weight = FILES[name]
    dest = models_dir() / weight.name
    status = check(name)
    if status.ok:
        skipped(status)
        return dest
    if status.state == "corrupt":
        print(f"{name}: {weight.name} is damaged ({status.detail}): fetching it again")
        dest.unlink()  # a damaged file must never pass for the model
    expected = expected_sha256(weight)
    url = weight_url(weight)
    print(f"{name}: downloading {weight.name} ({size_text(weight.about.size)}) from {url}")
    digest = download(
        url, dest, expected, attempts=attempts, retry_wait=retry_wait, progress=progress
    )
    if expected is None:
        # Not published: remember the first complete download so later copies can be checked.
        _record_path(dest).write_text(f"{digest}  {weight.name}\n")
        print(f"{name}: sha256 {digest} recorded in {_record_path(dest).name}")
    print(f"{name}: {dest} (sha256 verified)" if expected else f"{name}: {dest}")
    return dest


# -- before and after: room on the disks, removal ------------------------------------------


def plan(name: str, *, progress: bool = True) -> Download:
    """What fetching a model not (validly) present takes; a Stable Diffusion folder's sizes come
    from the hub's listing (network), the files' from About."""
    if name == CLIP:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
        return Download(name, CLIP_ABOUT.size, cache, lambda: _fetch_clip(progress))
    if name not in FILES:
        from engine import hub

        return hub.plan(name, progress=progress)
    partial = _partial_path(models_dir() / FILES[name].name)
    have = partial.stat().st_size if partial.is_file() else 0  # resumed, not fetched again
    size = max(FILES[name].about.size - have, 0)
    return Download(name, size, models_dir(), lambda: fetch(name, progress=progress))


def shortfall(downloads: list[Download]) -> list[str]:
    """Each disk without room for the downloads bound for it, said with the figures."""
    disks: dict[int, tuple[Path, int, list[str]]] = {}
    for d in downloads:
        root = next(p for p in (d.folder, *d.folder.parents) if p.exists())
        dev = root.stat().st_dev
        _, size, taken = disks.get(dev, (root, 0, []))
        disks[dev] = (root, size + d.size, [*taken, d.name])
    short = []
    for root, size, taken in disks.values():
        free = shutil.disk_usage(root).free
        if size > free:
            short.append(
                f"{', '.join(taken)} need {size_text(size)} on the disk of {root}, which has "
                f"{size_text(free)} free"
            )
    return short


def remove(name: str) -> list[Path]:
    """Delete a model's files and what was recorded about them; returns what went."""
    if name == CLIP:
        path = clip_cached_path()
        if path is None:
            return []
        _remove_hub_file(path)
        return [path]
    if name not in FILES:
        from engine import hub

        return hub.remove(name)
    dest = models_dir() / FILES[name].name
    gone = [p for p in (dest, _partial_path(dest), _record_path(dest)) if p.exists()]
    for path in gone:
        path.unlink()
    return gone


# -- command line ----------------------------------------------------------------------------


def _names(given: list[str], default: tuple[str, ...]) -> list[str]:
    known = names()
    unknown = [n for n in given if n not in known]
    if unknown:
        raise SystemExit(
            f"unknown weight name(s) {', '.join(unknown)}: choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(given)) or list(default)


def _failed(name: str, error: Exception, failed: list[str]) -> None:
    print(f"error: {name}: {error}", file=sys.stderr)
    failed.append(name)


def _fetch(given: list[str], progress: bool) -> int:
    """Plan every name, check the disks' room for all of them, then download; one model that
    cannot be fetched (no network) does not keep the others back."""
    print(f"models folder: {models_dir()}")
    failed: list[str] = []
    downloads = []
    for name in _names(given, REQUIRED):
        try:
            status = check(name)
            if status.ok:
                skipped(status)
            else:
                downloads.append(plan(name, progress=progress))
        except (OSError, http.client.HTTPException) as e:
            _failed(name, e, failed)
    if short := shortfall(downloads):
        for line in short:
            print(f"error: not enough disk space: {line}", file=sys.stderr)
        print("nothing was downloaded: free some space, or fetch fewer models", file=sys.stderr)
        return 1
    for d in downloads:
        print(f"{d.name}: {size_text(d.size)} to fetch")
        try:
            d.run()
        except (OSError, http.client.HTTPException) as e:
            _failed(d.name, e, failed)
    if failed:
        print(
            f"not fetched: {', '.join(failed)} (see above). Run the same command again to fetch "
            "them: what arrived is kept.",
            file=sys.stderr,
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download what is missing or damaged, skip what is valid")
    p.add_argument("names", nargs="*", metavar="NAME", help="see `list` (default: adm256 clip)")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("check", help="which models are present and valid")
    p.add_argument("names", nargs="*", metavar="NAME")
    sub.add_parser("list", help="every name: state, size, licence, what it is")
    p = sub.add_parser("remove", help="delete models' files")
    p.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("where", help="print the models folder")
    args = parser.parse_args(argv)

    if args.command == "where":
        print(models_dir())
        return 0
    if args.command == "check":
        results = [check(n) for n in _names(args.names, names())]
        for c in results:
            print(f"{c.state:10} {c.name:14} {c.path or c.file}: {c.detail}")
        return 0 if all(c.ok for c in results if c.name in REQUIRED) else 1
    if args.command == "list":
        print(f"models folder: {models_dir()}")
        for name in names():
            a, state = about(name), check(name).state
            print(f"{name:14} {state:10} {size_text(a.size):>8}  {a.licence:30} {a.what}")
        return 0
    if args.command == "remove":
        for name in _names(args.names, ()):
            gone = ", ".join(map(str, remove(name)))
            print(f"{name}: removed {gone}" if gone else f"{name}: not installed")
        return 0
    return _fetch(args.names, not args.no_progress)


if __name__ == "__main__":
    # engine.hub imports engine.weights: run that module's main, not a second copy of it as
    # __main__ (its exceptions would be other classes)
    from engine.weights import main as _main

    sys.exit(_main())
