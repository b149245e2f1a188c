"""Which models an engine serves, and its default.

`serve --model A --model B` serves the models named (names, diffusers folders, checkpoint
files), the first the default. With no `--model` it serves every model installed that it finds:
the per-user models folder (`install.py --models`), the folders given with `--model-dir` (where an
artist already keeps checkpoints: ComfyUI's `models/checkpoints`, A1111's
`models/Stable-diffusion`), and the demo models committed with the engine; the default is the
best of them, by `Entry.rank`. Random weights (tiny, tiny-latent) are served only when named:
they paint noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.shared.request import PIXEL

# the default's order: Stable Diffusion, then ADM, then the latent demo, then the pixel demo,
# then random weights (only ever named)
REAL_LATENT, REAL_PIXEL, DEMO_LATENT, DEMO_PIXEL, RANDOM = range(5)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_SCAN_DEPTH = 2  # ComfyUI's checkpoints folder keeps subfolders of checkpoints, one level


@dataclass(frozen=True)
class Entry:
    """One model an engine can serve."""

    name: str  # what jobs name it by, and hello lists
    source: str  # what engine/methods/loading.py loads: a name, a folder or a file
    method: str  # request.PIXEL | request.LATENT
    rank: int  # lower: a better default (the constants above)


def entry(model: str, name: str | None = None) -> Entry:
    """The entry of `model` as `serve --model` names it: a name the engine knows, a diffusers
    folder or a checkpoint file (named by its stem)."""
    from engine import latent_models
    from engine.methods.loading import method_of

    method = method_of(model)
    if model in ("tiny", latent_models.TINY):
        rank = RANDOM
    elif model == "demo":
        rank = DEMO_PIXEL
    elif model == latent_models.DEMO_LATENT:
        rank = DEMO_LATENT
    else:
        rank = REAL_PIXEL if method == PIXEL else REAL_LATENT
    known = method == PIXEL or model in latent_models.KNOWN or model == latent_models.DEMO_LATENT
    if name is None:
        name = model if known or model == latent_models.TINY else Path(model).expanduser().stem
    return Entry(name, model if known else str(Path(model).expanduser()), method, rank)


def named(models: Iterable[str]) -> list[Entry]:
    """The entries of `serve --model`'s models, ranked in the order named (the first is the
    default); a name taken twice gets a suffix."""
    entries = _unique(entry(m) for m in models)
    return [Entry(e.name, e.source, e.method, rank) for rank, e in enumerate(entries)]


def installed(dirs: Iterable[Path] = ()) -> list[Entry]:
    """Every model installed: the per-user models folder's, the checkpoints in `dirs`, the demo
    models; best first (the default's order)."""
    from engine import latent_models
    from engine.models import CONFIGS

    found = [entry(name) for name in latent_models.KNOWN if latent_models.installed(name)]
    for name, config in CONFIGS.items():
        if config.weight is not None and name != "demo" and _present(config.weight):
            found.append(entry(name))
    for folder in dirs:
        found += [entry(str(p)) for p in _checkpoints(Path(folder).expanduser())]
    found += [entry(latent_models.DEMO_LATENT), entry("demo")]
    return sorted(_unique(found), key=lambda e: e.rank)


def default(entries: list[Entry]) -> Entry:
    """The best entry (the first of the best rank: `--model`'s order)."""
    return min(entries, key=lambda e: e.rank)


def _present(weight) -> bool:
    from engine.weights import MissingWeights, locate

    try:
        locate(weight)
    except MissingWeights:
        return False
    return True


def _checkpoints(folder: Path, depth: int = _SCAN_DEPTH) -> list[Path]:
    """Checkpoint files and diffusers folders in `folder`, `depth` levels down, by name."""
    if not folder.is_dir() or depth == 0:
        return []
    found: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            found.append(path)
        elif path.is_dir() and (path / "model_index.json").is_file():
            found.append(path)
        elif path.is_dir():
            found += _checkpoints(path, depth - 1)
    return found


def _unique(entries: Iterable[Entry]) -> list[Entry]:
    """The same source once; another model of the same name gets -2, -3..."""
    out: list[Entry] = []
    for e in entries:
        if any(o.source == e.source for o in out):
            continue
        name, n = e.name, 2
        while any(o.name == name for o in out):
            name, n = f"{e.name}-{n}", n + 1
        out.append(Entry(name, e.source, e.method, e.rank))
    return out
