"""The models an engine serves: each loaded once at start to check and measure it, then kept
while the memory budget holds them, loaded again on first use after an eviction, least recently
used first out.

The budget covers the resident models plus the jobs (the server admits a job when its model and
its own peak fit, server.py). A model that fails to load (files missing, corrupt, not a model) is
kept in the list with its reason: hello reports it, its jobs are refused, the others serve. The
worker that runs jobs loads and evicts (`acquire`); the socket thread reads (`about`, `listing`).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import catalogue, devices
from engine.catalogue import Entry
from engine.methods import Description, Method

# A load holds the file's tensors beside the model's own for a moment: measured here (demo 45 MiB,
# demo-latent 50 MiB, 2-core CPU), RSS rose 80-140 MiB while each loaded, back to the model's
# size once the heap was trimmed. Room for that is made before a load.
LOAD_PEAK = 2


class Unavailable(Exception):
    """The model named cannot serve: the message says why (its files, or the budget)."""


@dataclass
class Model:
    """One model of the pool: what hello says of it."""

    entry: Entry
    about: Description | None = None  # None: it never loaded (`error` says why)
    error: str | None = None
    method: Method | None = None  # loaded now
    used: float = 0.0  # when a job last took it (monotonic)

    @property
    def size(self) -> int:
        return self.about.resident if self.about else 0

    def to_json(self, loaded: bool | None) -> dict[str, Any]:
        about, e = self.about, self.entry
        return {
            "name": e.name,
            "method": e.method,
            "where": e.source,
            "native": about.image_size if about else None,
            "weights": about.weights if about else None,
            "label": about.label if about else None,
            "bytes": self.size,
            "loaded": loaded,
            "error": self.error,
        }


def _never(entry: Entry) -> Method:
    raise Unavailable(f"model {entry.name}: a cluster's front end loads no model")


def amount(n: int) -> str:
    """Bytes as the artist reads them: "2.1 GB", "35 MB"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def loading_stage(name: str, size: int) -> str:
    """The progress stage a job shows while its model loads."""
    return f"loading {name}, {amount(size)}"


class Pool:
    def __init__(
        self,
        entries: list[Entry],
        load: Callable[[Entry], Method],
        *,
        budget: int,
        log: Callable[[str], None] = print,
        remote: bool = False,
    ) -> None:
        """`load`: the entry's method, its models loaded; `budget`: bytes for the resident
        models plus the jobs; `remote`: a cluster replica's, whose descriptions go to a front
        end on another machine (engine/methods: Method.describe)."""
        self.models = {e.name: Model(e) for e in entries}
        self._load, self.budget, self.log, self._remote = load, budget, log, remote
        self._lock = threading.Lock()
        self.front = False  # a front end's copy (`remote()`): it loads nothing, knows no state

    @classmethod
    def serving(cls, name: str, method: Method, budget: int | None = None) -> Pool:
        """A pool of one model already loaded (the CLI's, a test's); `budget` by default as
        `serve` sets it: 80% of the memory free before the model loaded."""
        about = method.describe()
        entry = catalogue.Entry(name, name, about.method, catalogue.REAL_PIXEL)
        pool = cls([entry], lambda _: method, budget=0)
        pool.models[name] = Model(entry, about, method=method, used=time.monotonic())
        before = int(0.8 * about.free_bytes() + about.resident)  # as if measured before loading
        pool.budget = budget if budget is not None else before
        return pool

    # -- what admission and hello read ------------------------------------------------------

    @property
    def default(self) -> str:
        """The best model that loads: catalogue.py's order, the named models' first."""
        working = [m.entry for m in self.models.values() if m.about is not None]
        return catalogue.default(working).name

    def methods(self) -> dict[str, str]:
        """Each model's method: which settings a job for it takes."""
        return {name: m.entry.method for name, m in self.models.items()}

    def about(self, name: str) -> Description:
        """The model as admission sees it; raises Unavailable when it cannot serve."""
        model = self.models[name]
        if model.about is None:
            raise Unavailable(f"model {name} cannot serve: {model.error}")
        return model.about

    def size(self, name: str) -> int:
        return self.models[name].size

    def listing(self) -> list[dict[str, Any]]:
        """hello's `available`; on a cluster's front end `loaded` is null: each replica has
        its own."""
        with self._lock:
            return [
                m.to_json(None if self.front else m.method is not None)
                for m in self.models.values()
            ]

    def remote(self) -> Pool:
        """A copy for a cluster's front end: the descriptions, sizes and errors, no models."""
        copy = Pool([], _never, budget=self.budget, log=self.log)
        copy.models = {n: Model(m.entry, m.about, m.error) for n, m in self.models.items()}
        copy.front = True
        return copy

    def __getstate__(self) -> dict[str, Any]:  # a front end's copy travels through Ray
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_load", "log")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _load=_never, log=print)

    def resident(self, but: str | None = None) -> int:
        loaded = (m for m in self.models.values() if m.method is not None)
        return sum(m.size for m in loaded if m.entry.name != but)

    # -- loading ------------------------------------------------------------------------------

    def survey(self) -> None:
        """Load every model once, one at a time, to check it and measure it; keep the default
        and then the others while the budget holds them. Raises ValueError when none loads."""
        for model in self.models.values():  # one loaded at a time while measuring
            self.log(f"checking {model.entry.name}")
            try:
                self._bring(model, lambda _: None)
            except Unavailable:
                continue
            self.log(f"{model.entry.name}: {model.about.label}, {amount(model.size)}")
            self._drop(model)
        if not any(m.about for m in self.models.values()):
            reasons = "; ".join(f"{m.entry.name}: {m.error}" for m in self.models.values())
            raise ValueError(f"no model could be loaded ({reasons})")
        rss = devices.rss_bytes()  # the engine idle: its libraries imported, no model loaded
        if rss is not None:
            self.log(f"no model loaded: RSS {amount(rss)} ({rss} bytes)")
        kept = sorted(self.models.values(), key=lambda m: m.entry.name != self.default)
        for model in kept:
            if model.about and self.resident() + model.size <= self.budget:
                self._bring(model, self.log)

    def acquire(self, name: str, job_bytes: int, loading: Callable[[str], None]) -> Method:
        """The model `name`, loaded (least recently used models evicted to make room for it
        and a job of `job_bytes`); `loading(stage)` is told before a load. Raises Unavailable."""
        model = self.models[name]
        if model.about is not None and model.size + job_bytes > self.budget:
            raise Unavailable(
                f"model {name} ({amount(model.size)}) and this edit ({amount(job_bytes)}) do not "
                f"fit the engine's memory budget ({amount(self.budget)})"
            )
        if model.method is None:
            self._evict(room=self.budget - max(LOAD_PEAK * model.size, model.size + job_bytes))
            self._bring(model, loading)
        self._evict(room=self.budget - model.size - job_bytes, keep=name)
        model.used = time.monotonic()
        assert model.method is not None
        return model.method

    def _bring(self, model: Model, loading: Callable[[str], None]) -> None:
        """Load `model` (its description and size measured); raises Unavailable with its
        error, kept for hello."""
        name = model.entry.name
        loading(loading_stage(name, model.size) if model.about else f"loading {name}")
        started = time.monotonic()
        try:
            method = self._load(model.entry)
        except MemoryError:
            raise
        except Exception as e:  # a missing, corrupt or foreign file: this model only
            model.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.log(f"model {name} cannot serve: {model.error}")
            raise Unavailable(f"model {name} cannot serve: {model.error}") from None
        with self._lock:
            model.about, model.method, model.error = method.describe(self._remote), method, None
            model.used = time.monotonic()
        devices.trim_host_memory()  # the load's transient copies back to the system
        self.log(f"{name} loaded in {time.monotonic() - started:.1f} s")

    def _evict(self, room: int, keep: str | None = None) -> None:
        """Drop the least recently used models but `keep` until the others hold <= `room`."""
        loaded = sorted(
            (m for m in self.models.values() if m.method is not None and m.entry.name != keep),
            key=lambda m: m.used,
        )
        for model in loaded:
            if self.resident(but=keep) <= room:
                return
            self.log(f"evicting {model.entry.name} ({amount(model.size)}): least recently used")
            self._drop(model)

    def _drop(self, model: Model) -> None:
        with self._lock:
            device = model.about.device if model.about else None
            model.method = None
        gc.collect()
        if device is not None:
            devices.free_cached_memory(device)
        devices.trim_host_memory()
