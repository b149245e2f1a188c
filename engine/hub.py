"""Stable Diffusion's diffusers folders, fetched from the Hugging Face hub into models_dir()/NAME
by huggingface_hub's snapshot_download (the repos are engine.latent_models.KNOWN's).

Only what the engine reads comes: model_index.json, scheduler/ and tokenizer/, and for each of
unet/, vae/ and text_encoder/ its config.json and one copy of its weights: the fp16 safetensors
where the repo has them (half the bytes; from_pretrained reads them as the "fp16" variant and
casts to the engine's precision), else the plain safetensors, else the plain .bin. The other
copies (fp32, .bin, non-EMA, Flax, ONNX), the single-file .ckpt/.safetensors at the repo's root
and the safety checker (the engine does not run it) stay on the hub. snapshot_download skips the
files already there whole and resumes a broken transfer within the run, from the last 10 MiB
chunk it wrote (huggingface_hub 2.x keeps no partial file for a later run). Each file's sha256
is checked against the hub's LFS record where it has one and written to NAME/SHA256SUMS
(`sha256sum -c SHA256SUMS` reads it too), which `check` verifies offline.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.latent_models import KNOWN, PARTS, _reason, installed
from engine.weight_files import (
    About,
    Check,
    ChecksumMismatch,
    Download,
    DownloadError,
    models_dir,
    sha256_of,
    size_text,
    skipped,
)

SUMS = "SHA256SUMS"
SD1, SD2 = "CreativeML OpenRAIL-M", "CreativeML OpenRAIL++-M"
# the fp16 files' sizes, from the parameter counts: what `list` shows before any listing
SD1_SIZE, SD2_SIZE = 2_130_000_000, 2_580_000_000
ABOUT = {
    "sd15": About("Stable Diffusion 1.5: the latent method", SD1_SIZE, SD1),
    "sd15-inpaint": About("Stable Diffusion 1.5 inpainting: the latent method", SD1_SIZE, SD1),
    "sd21-base": About("Stable Diffusion 2.1 base, 512: the latent method", SD2_SIZE, SD2),
    "sd21": About("Stable Diffusion 2.1, 768, v-prediction: the latent method", SD2_SIZE, SD2),
    "sd2-inpaint": About("Stable Diffusion 2 inpainting: the latent method", SD2_SIZE, SD2),
}
WHOLE = ("scheduler", "tokenizer")  # small folders: every file
# a component's weights, best first: NAME.fp16.safetensors, NAME.safetensors, NAME.bin
WEIGHTS = [re.compile(rf"[^./]+\.{t}\Z") for t in (r"fp16\.safetensors", "safetensors", "bin")]


@dataclass(frozen=True)
class Remote:
    """The files to fetch from a repo at one commit: path -> (size, sha256 where the hub has
    one: its LFS files')."""

    repo: str
    commit: str
    files: dict[str, tuple[int, str | None]]


def choose(paths: Iterable[str]) -> list[str]:
    """Of a repo's files, those the engine reads (see the module's docstring)."""
    paths = sorted(paths)
    chosen = [p for p in paths if p == "model_index.json" or p.split("/")[0] in WHOLE]
    for part in PARTS:
        files = [p.removeprefix(f"{part}/") for p in paths if p.startswith(f"{part}/")]
        chosen += [f"{part}/config.json"] if "config.json" in files else []
        for pattern in WEIGHTS:
            if found := [f for f in files if pattern.fullmatch(f)]:
                chosen += [f"{part}/{f}" for f in found]
                break
    return chosen


def listing(name: str) -> Remote:
    """The files to fetch for `name`, from the hub's listing of its repo (network)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    repo = KNOWN[name].repo
    api = HfApi()
    try:
        commit = api.repo_info(repo).sha
        tree = list(api.list_repo_tree(repo, recursive=True, revision=commit))
    except Exception as e:  # the hub's own errors (offline, HTTP) become one message
        raise DownloadError(f"the hub's listing of {repo} is out of reach ({_reason(e)})") from e
    files = {f.path: f for f in tree if isinstance(f, RepoFile)}
    chosen = {p: files[p] for p in choose(files)}
    return Remote(repo, commit, {p: (f.size, f.lfs and f.lfs.sha256) for p, f in chosen.items()})


def plan(name: str, *, progress: bool = True) -> Download:
    """The bytes still to come for `name`: the chosen files not there whole, or damaged."""
    remote = listing(name)
    folder = models_dir() / name
    damaged = set(_damaged(folder))
    size = sum(
        s for p, (s, _) in remote.files.items()
        if p in damaged or not (folder / p).is_file() or (folder / p).stat().st_size != s
    )  # fmt: skip
    return Download(name, size, folder, lambda: fetch(name, remote, progress=progress))


def fetch(name: str, remote: Remote | None = None, *, progress: bool = True) -> Path:
    """Make the folder of `name` complete and valid: skip it when it is, fetch what it lacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    folder = models_dir() / name
    status = check(name)
    if status.ok:
        skipped(status)
        return folder
    for rel in _damaged(folder):  # fetched again, never kept
        print(f"{name}: {rel} is damaged: fetching it again")
        (folder / rel).unlink(missing_ok=True)
    remote = remote or listing(name)
    total = size_text(sum(s for s, _ in remote.files.values()))
    print(f"{name}: {len(remote.files)} files ({total}) of {remote.repo} through huggingface_hub")
    if not progress:
        disable_progress_bars()
    try:
        snapshot_download(
            remote.repo, revision=remote.commit, local_dir=folder, allow_patterns=list(remote.files)
        )
    except Exception as e:  # the hub's own errors (offline, HTTP) become one message
        raise DownloadError(
            f"{remote.repo}: {_reason(e)}; the files that arrived whole are kept in {folder}: run "
            "the same command again for the rest"
        ) from e
    sums = {}
    for rel, (_, expected) in remote.files.items():
        digest = sha256_of(folder / rel)
        if expected and digest != expected:
            (folder / rel).unlink()
            raise ChecksumMismatch(
                f"{name}: {rel}: sha256 mismatch: the hub's file hashes to {digest}, expected "
                f"{expected} (its LFS record). It was removed; try again."
            )
        sums[rel] = digest
    tmp = folder / f".{SUMS}.tmp"
    tmp.write_text("".join(f"{d}  {rel}\n" for rel, d in sums.items()))
    os.replace(tmp, folder / SUMS)
    print(f"{name}: {folder} (sha256 of {len(sums)} files checked, recorded in {SUMS})")
    return folder


def _sums(folder: Path) -> dict[str, str] | None:
    try:
        lines = (folder / SUMS).read_text().splitlines()
    except OSError:
        return None
    return {rel: digest for digest, rel in (ln.split("  ", 1) for ln in lines if "  " in ln)}


def _damaged(folder: Path) -> list[str]:
    """The files SHA256SUMS records that are gone or hash otherwise."""
    sums = _sums(folder) or {}
    return [
        rel for rel, digest in sums.items()
        if not (folder / rel).is_file() or sha256_of(folder / rel) != digest
    ]  # fmt: skip


def check(name: str) -> Check:
    folder, repo = models_dir() / name, KNOWN[name].repo
    if not installed(name):
        what = "incomplete: fetch it again for the rest" if folder.exists() else "not downloaded"
        return Check(name, repo, folder, "missing", f"{size_text(ABOUT[name].size)}, {what}")
    sums = _sums(folder)
    if sums is None:
        return Check(name, repo, folder, "unverified", f"present, no {SUMS}")
    if damaged := _damaged(folder):
        return Check(name, repo, folder, "corrupt", f"{', '.join(damaged)} differ from {SUMS}")
    return Check(name, repo, folder, "ok", f"sha256 of {len(sums)} files verified")


def remove(name: str) -> list[Path]:
    folder = models_dir() / name
    if not folder.exists():
        return []
    shutil.rmtree(folder)
    return [folder]
