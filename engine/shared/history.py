"""A document's runs, as a plug-in lists them: what each variant looks like, its seed, its rank.

Host-agnostic (no Qt, no Krita, no GIMP): a run starts with the request the artist sent; while the
engine works its variants' previews (client.Preview, PNG) arrive and the best so far is the
one of lowest CLIP distance; when the result arrives the variants take their rank, distance and
layer name, best first. Keep, Discard, Again and Vary are decided here (which layer stays, which
settings to send); the plug-in's adapter does them to the document.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RUNNING, DONE, KEPT, DISCARDED = "running", "done", "kept", "discarded"
LIMIT = 20  # runs remembered per document: the oldest go first


def closest(candidates: Iterable[Any]) -> Any | None:
    """The one of lowest CLIP distance (a preview or a Shot: the best so far); None when none
    has a distance yet (an unguided step's previews)."""
    return min((c for c in candidates if c.distance is not None), key=lambda c: c.distance,
               default=None)  # fmt: skip


@dataclass
class Shot:
    """One variant of a run."""

    seed: int
    picture: bytes = b""  # PNG: the latest preview while running
    step: int = 0  # the step `picture` shows
    distance: float | None = None  # CLIP distance (lower is closer)
    rank: int | None = None  # 1 = best, once the result arrived
    layer: str = ""  # its result layer's name
    result: Any = None  # the client's result Variant (rgba, x, y, ...)

    @property
    def label(self) -> str:
        """What a thumbnail's tooltip says."""
        rank = f"#{self.rank} " if self.rank else f"step {self.step} " if self.step else ""
        dist = f", CLIP d={self.distance:.3f}" if self.distance is not None else ""
        return f"{rank}seed {self.seed}{dist}"


@dataclass(eq=False)
class Run:
    id: int
    prompt: str
    settings: dict[str, Any]  # the request's settings, as sent
    group: str = ""  # the result group's (or layer group's) name in the document
    state: str = RUNNING
    shots: list[Shot] = field(default_factory=list)  # seed order while running, best first after
    source: Any = None  # what the plug-in needs to run it again (its export)

    def shot(self, seed: int) -> Shot:
        for s in self.shots:
            if s.seed == seed:
                return s
        self.shots.append(Shot(seed))
        self.shots.sort(key=lambda s: s.seed)
        return self.shot(seed)

    def preview(self, previews: Iterable[Any]) -> None:
        """Take a progress event's previews (engine.shared.client.Preview)."""
        for p in previews:
            shot = self.shot(p.seed)
            shot.picture, shot.step, shot.distance = p.png, p.step, p.distance

    @property
    def best(self) -> Shot | None:
        """The best so far: the ranked first once done, else the lowest distance shown."""
        ranked = [s for s in self.shots if s.rank]
        if ranked:
            return min(ranked, key=lambda s: s.rank)
        return closest(self.shots)

    def finish(self, group: str, variants: list[Any], layers: list[Any]) -> None:
        """The result: `variants` (client Variants, best first) with their layers' names."""
        self.group, self.state = group, DONE
        for v, layer in zip(variants, layers, strict=True):
            shot = self.shot(v.seed)
            shot.rank, shot.distance, shot.layer, shot.result = v.rank, v.distance, layer.name, v
        self.shots.sort(key=lambda s: (s.rank is None, s.rank or 0, s.seed))

    def again(self) -> dict[str, Any]:
        """The run's settings with a new seed (the engine draws one)."""
        return {**self.settings, "seed": None}

    def vary(self, shot: Shot) -> dict[str, Any]:
        """The run's settings from that variant's seed, one variant: its seed reproduces it, so
        change the prompt or the strength to vary it."""
        return {**self.settings, "seed": shot.seed, "variants": 1}


class History:
    """The runs of each open document since the host started (newest first). Documents are
    told apart by `==`, not by hash: a host's document wrappers (Krita's) compare equal but
    are not hashable, and each call may return a new wrapper of the same document."""

    def __init__(self) -> None:
        self._runs: list[tuple[Any, list[Run]]] = []
        self._next = 1

    def _of(self, document: Any) -> list[Run] | None:
        return next((runs for doc, runs in self._runs if doc == document), None)

    def start(self, document: Any, prompt: str, settings: dict[str, Any], source=None) -> Run:
        run = Run(self._next, prompt, dict(settings), source=source)
        self._next += 1
        runs = self._of(document)
        if runs is None:
            runs = []
            self._runs.append((document, runs))
        runs.insert(0, run)
        del runs[LIMIT:]
        return run

    def runs(self, document: Any) -> list[Run]:
        """The document's runs still in it, newest first."""
        return [r for r in self._of(document) or [] if r.state != DISCARDED]

    def forget(self, document: Any) -> None:
        self._runs = [(doc, runs) for doc, runs in self._runs if doc != document]

    @staticmethod
    def keep(run: Run, shot: Shot) -> str:
        """Only `shot` stays of `run`: the name of the layer that remains."""
        if shot.rank is None or run.state != DONE:
            raise ValueError("only a finished run's variants can be kept")
        run.state = KEPT
        run.shots = [shot]
        return shot.layer

    @staticmethod
    def discard(run: Run) -> None:
        run.state = DISCARDED
