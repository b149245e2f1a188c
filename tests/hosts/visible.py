"""The scene both real-host tests paint to check that a plug-in sends what the artist sees, and
the picture the engine must then receive (tests/recording_engine.py keeps what it did).

A background painted R = 2x, G = 3y, B = 90 (each pixel says where it is) under a transparent
"Ink" layer with one blue stroke; Ink is the active layer; a hard rectangle is selected over
the stroke and the background around it. Then a group on top holding a layer painted green in
its leftmost columns and transparent elsewhere is the active layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.shared import geometry
from engine.shared.geometry import Rect
from tests.recording_engine import received

SELECTION, GROW = [30, 20, 36, 24], 3
SCENE = {
    "selection": SELECTION,
    "ink": [40, 26, 12, 8],
    "ink_rgba": [30, 60, 220, 255],
    "visible_prompt": "what the artist sees",
    "layer_prompt": "this layer only",
    "group_prompt": "a group is active",
    "group_alone_prompt": "this group only",
    "shaping": {"grow": GROW, "feather": 4},  # the group's edit, from the UI's Grow and Feather
    # a result of that edit covers at least the selection grown by GROW
    "grown": [SELECTION[0] - GROW, SELECTION[1] - GROW, SELECTION[2] + 2 * GROW,
              SELECTION[3] + 2 * GROW],  # fmt: skip
}


def expected(size: tuple[int, int], layer_only: bool) -> np.ndarray:
    """The window the plug-in must send, as RGBA: the visible picture, or the Ink layer alone
    (transparent around the stroke)."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    picture = np.zeros((height, width, 4), np.uint8)
    if not layer_only:
        picture[..., 0], picture[..., 1], picture[..., 2], picture[..., 3] = 2 * xs, 3 * ys, 90, 255
    x, y, w, h = SCENE["ink"]
    picture[y : y + h, x : x + w] = SCENE["ink_rgba"]
    win = window(size)
    return picture[win.y : win.y + win.height, win.x : win.x + win.width]


def window(size: tuple[int, int]) -> Rect:
    return geometry.context_window(Rect(*SCENE["selection"]), size)


def describe(image: np.ndarray, size: tuple[int, int]) -> dict:
    """What a received picture holds, for the test's report: beside and on the stroke."""
    win, (x, y, w, h) = window(size), SCENE["ink"]
    beside, on = (x - 5 - win.x, y + 2 - win.y), (x + w // 2 - win.x, y + h // 2 - win.y)
    return {
        "size": [int(image.shape[1]), int(image.shape[0])],
        f"rgba_beside_the_stroke_at_{x - 5},{y + 2}": image[beside[1], beside[0]].tolist(),
        f"rgba_on_the_stroke_at_{x + w // 2},{y + h // 2}": image[on[1], on[0]].tolist(),
        "transparent_pixels": int((image[..., 3] == 0).sum()),
        "distinct_rgba": int(len(np.unique(image.reshape(-1, 4), axis=0))),
    }


def check_received(folder: Path, size: tuple[int, int], green_columns: int) -> dict:
    """Assert what the engine received for each of the scene's edits; what it held, to report."""
    report = {}
    for prompt, layer_only in ((SCENE["visible_prompt"], False), (SCENE["layer_prompt"], True)):
        jobs = received(folder, prompt)
        assert len(jobs) == 1, f"the engine received {len(jobs)} jobs for {prompt!r}"
        image = jobs[0][0]
        report[prompt] = describe(image, size)
        want = expected(size, layer_only)
        assert image.shape == want.shape, (image.shape, want.shape)
        wrong = np.argwhere((image != want).any(-1))
        assert not len(wrong), f"{prompt}: {len(wrong)} pixels differ, first {wrong[:3].tolist()}"
    jobs = received(folder, SCENE["group_prompt"])
    assert len(jobs) == 1
    sent = jobs[0][2]
    assert {k: sent[k] for k in SCENE["shaping"]} == SCENE["shaping"], sent
    jobs = received(folder, SCENE["group_alone_prompt"])  # the group as it shows on its own
    assert len(jobs) == 1
    win, alpha = window(size), jobs[0][0][..., 3]
    green = np.arange(win.x, win.x + win.width) < green_columns
    assert (alpha[:, green] == 255).all() and (alpha[:, ~green] == 0).all()
    return report
