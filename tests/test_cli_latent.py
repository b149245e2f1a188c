"""`python -m engine edit --model tiny-latent`: the latent method from the command line, with
random weights (scores.json says so), and a corrupt checkpoint refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.engine import run_cli as engine


@pytest.fixture
def picture(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(2)
    image = (rng.random((72, 100, 3)) * 255).astype(np.uint8)
    mask = np.zeros((72, 100), np.uint8)
    mask[20:50, 30:75] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


def edit(picture, out: Path, *options: str) -> dict:
    image, mask = picture
    done = engine(
        "edit", str(image), "--mask", str(mask), "--prompt", "a red ball", "--out", str(out),
        "--model", "tiny-latent", "--device", "cpu", "--steps", "6", *options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "scores.json").read_text())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_an_edit_keeps_the_outside_and_its_seeds_and_negative_prompt_hold(picture, tmp_path):
    source, mask = pixels(picture[0]), pixels(picture[1])[..., 0]
    scores = edit(picture, tmp_path / "a", "--variants", "2", "--seed", "7")
    assert "tiny-latent (random weights)" in scores["models"]
    assert scores["settings"]["variants"] == 2 and "negative_prompt" not in scores["settings"]
    for v in scores["variants"]:
        out = pixels(tmp_path / "a" / v["file"])
        assert np.array_equal(out[mask == 0], source[mask == 0])
        assert np.abs(out[mask > 0].astype(int) - source[mask > 0]).mean() > 3
    second = next(v for v in scores["variants"] if v["seed"] == 8)
    alone = edit(picture, tmp_path / "b", "--variants", "1", "--seed", "8")
    assert alone["variants"][0]["seed"] == 8
    first_alone = pixels(tmp_path / "b" / "rank-1.png")
    assert np.array_equal(first_alone, pixels(tmp_path / "a" / second["file"]))
    negative = edit(picture, tmp_path / "c", "--variants", "1", "--seed", "8",
                    "--negative-prompt", "blue water")  # fmt: skip
    assert negative["settings"]["negative_prompt"] == "blue water"
    assert not np.array_equal(pixels(tmp_path / "c" / "rank-1.png"), first_alone)


def test_another_methods_setting_and_a_corrupt_checkpoint_fail_in_one_line(picture, tmp_path):
    image, mask = picture
    out = str(tmp_path / "o")
    refused = engine("edit", str(image), "--mask", str(mask), "--prompt", "x", "--out", out,
                     "--model", "tiny-latent", "--augmentations", "2")  # fmt: skip
    assert refused.returncode != 0 and "latent method does not take augmentations" in refused.stderr
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    failed = engine("edit", str(image), "--mask", str(mask), "--prompt", "x", "--out", out,
                    "--model", str(corrupt), "--device", "cpu")  # fmt: skip
    assert failed.returncode != 0 and str(corrupt) in failed.stderr
    assert "Traceback" not in failed.stderr
