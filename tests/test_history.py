"""The plug-ins' run history (engine/shared/history.py): previews while running, the best so far,
results ranked, Keep / Discard / Again / Vary decided host-agnostically."""

from __future__ import annotations

import pytest

from engine.shared.client import Preview, Variant
from engine.shared.history import DISCARDED, DONE, KEPT, LIMIT, RUNNING, History
from engine.shared.wording import ResultLayer

SETTINGS = {"variants": 3, "seed": 40, "steps": 50, "skip": 10}


def previews(step: int, distances: list[float | None]) -> list[Preview]:
    return [
        Preview(i, 40 + i, d, step, 8, 4, f"png {step} {i}".encode(), (0, 0, 16, 8))
        for i, d in enumerate(distances)
    ]


def finished(history: History, doc="doc"):
    run = history.start(doc, "a red ball", SETTINGS, source="export")
    run.preview(previews(3, [0.9, 0.7, 0.8]))
    # the result, best first: seed 41, 42, 40
    variants = [Variant(r, 0, 0, 2, 1, bytes(8), d, s)
                for r, (d, s) in enumerate([(0.5, 41), (0.6, 42), (0.7, 40)], 1)]  # fmt: skip
    layers = [ResultLayer(f"layer {v.rank}", 0, 0, 2, 1, v.rgba, v.rank == 1) for v in variants]
    run.finish("group", variants, layers)
    return run


def test_previews_fill_the_variants_in_seed_order_and_the_best_is_the_closest():
    run = History().start("doc", "a red ball", SETTINGS)
    assert run.state == RUNNING and run.best is None
    run.preview(previews(2, [None, 0.8, 0.9]))
    assert [s.seed for s in run.shots] == [40, 41, 42]
    assert run.best.seed == 41 and run.best.picture == b"png 2 1"
    run.preview(previews(4, [0.5, 0.8, 0.9]))  # a later step: pictures replaced, best moves
    assert run.best.seed == 40 and run.best.step == 4 and len(run.shots) == 3
    assert run.shots[0].label == "step 4 seed 40, CLIP d=0.500"


def test_the_result_ranks_the_variants_and_names_their_layers():
    run = finished(History())
    assert run.state == DONE and run.group == "group"
    assert [(s.rank, s.seed, s.layer) for s in run.shots] == [
        (1, 41, "layer 1"), (2, 42, "layer 2"), (3, 40, "layer 3")]  # fmt: skip
    assert run.best.rank == 1 and run.shots[0].picture == b"png 3 1"  # its last preview kept
    assert run.shots[1].label == "#2 seed 42, CLIP d=0.600"


def test_keep_discard_again_and_vary():
    history = History()
    run = finished(history)
    other = finished(history)
    assert history.runs("doc") == [other, run]  # newest first
    second = run.shots[1]
    assert run.vary(second) == {**SETTINGS, "seed": 42, "variants": 1}
    assert run.again() == {**SETTINGS, "seed": None}
    assert history.keep(run, second) == "layer 2"
    assert run.state == KEPT and run.shots == [second]
    with pytest.raises(ValueError):  # nothing else of it left to keep
        history.keep(run, second)
    history.discard(other)
    assert other.state == DISCARDED and history.runs("doc") == [run]
    running = history.start("doc", "x", SETTINGS)
    with pytest.raises(ValueError):
        history.keep(running, running.shot(40))


class Wrapper:
    """Like Krita's Document: a new wrapper per call, equal when the document is, unhashable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other) -> bool:
        return isinstance(other, Wrapper) and other.name == self.name

    __hash__ = None


def test_documents_are_told_apart_by_equality_not_by_hash():
    history = History()
    run = history.start(Wrapper("a"), "x", SETTINGS)
    assert history.runs(Wrapper("a")) == [run] and history.runs(Wrapper("b")) == []


def test_each_document_has_its_own_runs_and_only_the_newest_are_kept():
    history = History()
    for _ in range(LIMIT + 5):
        history.start("a", "x", SETTINGS)
    history.start("b", "y", SETTINGS)
    assert len(history.runs("a")) == LIMIT and [r.prompt for r in history.runs("b")] == ["y"]
    history.forget("a")
    assert history.runs("a") == []
