"""`python -m engine edit` and `bench` as a user runs them."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.engine import run_cli as engine


@pytest.fixture
def picture(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 30:60] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


def tiny_edit(picture, out: Path, *options: str) -> subprocess.CompletedProcess:
    """`edit` of the test picture with the tiny model, "a red circle", results in `out`."""
    image, mask = picture
    return engine("edit", str(image), "--mask", str(mask), "--prompt", "a red circle",
                  "--out", str(out), "--model", "tiny", *options)  # fmt: skip


def test_edit_writes_ranked_full_size_results_and_sorted_scores(picture, tmp_path):
    image, mask = picture
    out = tmp_path / "out"
    done = tiny_edit(picture, out, "--variants", "3", "--steps", "10", "--skip", "2", "--seed", "9")
    assert done.returncode == 0, done.stderr
    scores = json.loads((out / "scores.json").read_text())
    assert "random weights" in scores["models"]  # the tiny model never passes for a real one
    entries = scores["variants"]
    assert [e["rank"] for e in entries] == [1, 2, 3]
    assert [e["file"] for e in entries] == ["rank-1.png", "rank-2.png", "rank-3.png"]
    dists = [e["clip_distance"] for e in entries]
    assert dists == sorted(dists)
    assert sorted(e["seed"] for e in entries) == [9, 10, 11]
    source = np.asarray(Image.open(image))
    outside = np.asarray(Image.open(mask)) == 0
    for e in entries:
        result = np.asarray(Image.open(out / e["file"]))
        assert result.shape == source.shape
        assert (result[outside] == source[outside]).all()
    assert "denoising" in done.stderr  # the progress bar
    # which model made them, in the layers' format (engine/shared/wording.py's made_by)
    assert (scores["model"], scores["weights"]) == ("tiny", "random")
    assert scores["made_by"] == "tiny [random weights]"


def test_edit_through_an_engine_names_one_of_its_models_or_gets_its_default(picture, tmp_path):
    from tests.helpers.engine import start_serve

    log = (tmp_path / "serve.log").open("w")
    proc = start_serve(log, "--model", "demo")  # tiny (the default) and demo
    try:
        endpoint = proc.stdout.readline().split()[3]
        runs, (image, mask) = {}, picture
        quick = ["--steps", "4", "--skip", "1", "--variants", "1", "--no-refine"]
        for name, model in (("named", ["--model", "demo"]), ("default", []),
                            ("unknown", ["--model", "sd99"])):  # fmt: skip
            runs[name] = engine("edit", str(image), "--mask", str(mask), "--prompt", "a red circle",
                                "--out", str(tmp_path / name), "--engine", endpoint, *quick,
                                *model)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()
        log.close()
    made = {}
    for name in ("named", "default"):
        assert runs[name].returncode == 0, runs[name].stderr
        made[name] = json.loads((tmp_path / name / "scores.json").read_text())["made_by"]
    assert made == {"named": "demo [demo model]", "default": "tiny [random weights]"}
    refused = runs["unknown"]
    assert refused.returncode == 2
    assert "unknown model 'sd99': this engine serves tiny, demo" in refused.stderr


def test_edit_grows_and_feathers_the_selection_and_keeps_the_rest(picture, tmp_path):
    image, _ = picture
    out = tmp_path / "out"
    done = tiny_edit(picture, out, "--variants", "1", "--steps", "6", "--skip", "2", "--seed", "1",
                     "--grow", "3", "--feather", "4")  # fmt: skip
    assert done.returncode == 0, done.stderr
    source = np.asarray(Image.open(image)).astype(int)
    result = np.asarray(Image.open(out / "rank-1.png")).astype(int)
    changed = np.abs(result - source).sum(axis=2) > 0
    assert changed[10:30, 30:60].mean() > 0.9
    assert changed[10:30, 25:30].any() and changed[5:10, 30:60].any()  # grown and feathered
    reach = np.ones_like(changed)
    reach[10 - 3 - 7 : 30 + 3 + 7, 30 - 3 - 7 : 60 + 3 + 7] = False  # grow + 3 sigma
    assert not changed[reach].any()


def test_help_prints_every_setting_with_its_range():
    done = engine("edit", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps the lines
    assert "--strength STRENGTH how much of the selection may change" in text
    assert "(1 to 100 %; default 75)" in text


def test_a_missing_file_fails_clearly(picture, tmp_path):
    _, mask = picture
    done = engine("edit", str(tmp_path / "nope.png"), "--mask", str(mask), "--prompt", "x",
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert done.returncode == 2
    assert "nope.png" in done.stderr and "Traceback" not in done.stderr


def test_an_empty_mask_fails_clearly(picture, tmp_path):
    image, _ = picture
    Image.fromarray(np.zeros((50, 70), np.uint8)).save(tmp_path / "empty.png")
    done = engine("edit", str(image), "--mask", str(tmp_path / "empty.png"), "--prompt", "x",
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert done.returncode == 2 and "selection is empty" in done.stderr
    assert not (tmp_path / "o").exists()


def test_a_mask_of_another_size_fails_clearly(picture, tmp_path):
    image, _ = picture
    Image.fromarray(np.full((40, 70), 255, np.uint8)).save(tmp_path / "small.png")
    done = engine("edit", str(image), "--mask", str(tmp_path / "small.png"), "--prompt", "x",
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert done.returncode == 2 and "70x40" in done.stderr and "70x50" in done.stderr


def test_bench_prints_both_formulations_measured_in_one_run():
    done = engine("bench", "--model", "tiny", "--steps", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reference_step_s"] > 0 and result["engine_step_s"] > 0
    # the step times are rounded to 1 ms, which is a few percent of a tiny model's step
    assert result["ratio"] == pytest.approx(
        result["engine_step_s"] / result["reference_step_s"], rel=0.1
    )
    # CPU seconds too: a step cannot run on more threads than torch has
    assert 0 < result["engine_step_cpu_s"] <= result["engine_step_s"] * result["threads"] * 1.1
    assert result["cpu_ratio"] == pytest.approx(
        result["engine_step_cpu_s"] / result["reference_step_cpu_s"], rel=0.1
    )
    assert result["peak_rss_mb"] >= max(
        result["reference_peak_rss_mb"], result["engine_peak_rss_mb"]
    )
    # each row names the precision it ran in, and the machine its kind
    assert result["reference_precision"] == "fp32"  # the official step on a CPU
    assert [r["precision"] for r in result["engine_by_batch"]] == [result["precision"]]
    assert set(result["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx"}
    if "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in result["cpu_flags"]
    # previews timed apart from the step they follow: their cost is a ratio of the step
    assert result["preview_s"] > 0
    assert result["preview_cost"] == pytest.approx(
        result["preview_s"] / result["engine_step_s"], rel=0.1
    )
    assert result["isa"] == "native"
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # capped at AVX2, the children run as a CPU without bf16 would: ATen's AVX2 kernels, fp32
    table = engine("bench", "--model", "tiny", "--steps", "1", "--no-breakdown", "--refine", "2",
                   "--isa", "avx2")  # fmt: skip
    assert table.returncode == 0, table.stderr
    if "avx2" in result["cpu_flags"]:
        assert "run as AVX2, capped" in table.stdout
        assert re.search(r"engine, batch 1 +fp32 ", table.stdout)
    assert "previews (a preview every step, worst case)" in table.stdout
    # the refinement at 2x the tiny model's 32 px: 3 x 3 tiles of 32 over 64, half shared
    assert re.search(r"refinement at 2x \(9 tiles\): [\d.]+ s/step, \d+ steps", table.stdout)


def test_a_variants_reported_seed_alone_reproduces_its_pixels(picture, tmp_path):
    """Rank 2's seed with --variants 1 gives rank 2's picture byte for byte: each variant's
    noise and augmentations come from its own seed, and variants go through the models one at
    a time (a batch's kernels would round them differently)."""
    image, mask = picture
    common = ("--model", "demo", "--steps", "12", "--skip", "3", "--prompt", "a red circle")
    run = engine("edit", str(image), "--mask", str(mask), "--out", str(tmp_path / "all"),
                 "--variants", "3", "--seed", "40", *common)  # fmt: skip
    assert run.returncode == 0, run.stderr
    second = json.loads((tmp_path / "all" / "scores.json").read_text())["variants"][1]
    again = engine("edit", str(image), "--mask", str(mask), "--out", str(tmp_path / "one"),
                   "--variants", "1", "--seed", str(second["seed"]), *common)  # fmt: skip
    assert again.returncode == 0, again.stderr
    first = np.asarray(Image.open(tmp_path / "all" / second["file"]))
    assert (np.asarray(Image.open(tmp_path / "one" / "rank-1.png")) == first).all()
