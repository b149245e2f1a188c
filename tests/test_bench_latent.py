"""`python -m engine bench` with a latent model (engine/bench_latent.py), and tests/gpu_check.sh's
smoke on the CPU with the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import bench_latent
from engine.shared import request

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "step_s", "encode_s", "decode_s", "text_s", "edit_s", "edit_measured_s", "lcm_step_s",
    "lcm_edit_s", "bd_edit_s", "ratio", "lcm_ratio", "threads", "edit_cpu_s", "cpu_ratio",
)  # fmt: skip
PARTS = {"text", "vae", "step", "lcm_step", "edit", "pixel"}


def _avx2() -> bool:
    return "avx2" in bench_latent.bench.cpu_flags()


def test_bench_composes_the_latent_edit_and_sets_it_against_the_pixel_one():
    """tiny-latent against the tiny pixel model, one timed step each, the edit also run end to
    end; capped at AVX2 where the CPU has it: every child then runs as a CPU without bf16."""
    isa = ["--isa", "avx2"] if _avx2() else []
    done = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--model", "tiny-latent", "--pixel-model",
         "tiny", "--steps", "1", "--full-edit", "--json", *isa],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in KEYS:
        assert isinstance(result[key], int | float) and result[key] > 0, key
    assert set(result["peak_rss_mb"]) == PARTS and min(result["peak_rss_mb"].values()) > 0
    assert result["edit_from"] == "measured parts"
    assert result["ratio"] == pytest.approx(result["edit_s"] / result["bd_edit_s"], rel=1e-2)
    assert result["lcm_ratio"] == pytest.approx(
        result["lcm_edit_s"] / result["bd_edit_s"], rel=1e-2
    )
    assert result["cpu_ratio"] == pytest.approx(
        result["edit_cpu_s"] / result["bd_edit_cpu_s"], rel=1e-2
    )
    # the request's defaults: 4 variants, DPM++ 2M Karras 25 steps at 75% (19 run), CFG (batch
    # 2); LCM 4 steps at guidance 1 (batch 1); the pixel method's 75 steps, 4 variants
    latent = request.check({}, method="latent")
    assert result["edit"]["steps_run"] == latent.steps_run == 19
    assert result["edit"]["variants"] == latent.variants == 4
    assert (result["unet_batch"], result["lcm_unet_batch"]) == (2, 1)
    assert result["lcm_edit"]["steps_run"] == 4
    parts = result["edit_parts_s"]
    assert result["edit_s"] == pytest.approx(sum(parts.values()), abs=0.01)
    assert parts["denoise"] == pytest.approx(4 * 19 * result["step_s"], rel=1e-2, abs=0.01)
    assert parts["decode"] == pytest.approx(4 * result["decode_s"], rel=1e-2, abs=1e-3)
    assert result["lcm_edit_parts_s"]["denoise"] == pytest.approx(
        4 * 4 * result["lcm_step_s"], rel=1e-2, abs=0.01
    )  # the step times are rounded to 0.1 ms, a tiny model's step a few ms
    assert result["bd_edit_s"] == pytest.approx(75 * 4 * result["bd_step_s"], rel=1e-2)
    assert result["edit_measured_canvas"] == [64, 64]  # tiny-latent's native side
    assert result["device"] == "cpu" and result["device_peak_mb"] == {}
    assert set(result["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert (result["channels_last"], result["attention"]) == (False, "engine")
    if isa:
        assert result["isa"] == "avx2" and result["cpu_capability"] == "AVX2"
        assert result["precision"] == result["bd_precision"] == "fp32"
    table = bench_latent.table(result)
    assert "ratio latent / pixel" in table and "end to end" in table


def test_gpu_check_smoke_on_the_cpu(tmp_path):
    """The GPU check's script on the CPU with the tiny models (its JSON kept in $OUT)."""
    env = os.environ | {
        "DEVICE": "cpu", "MODEL_PIXEL": "tiny", "MODEL_LATENT": "tiny-latent", "STEPS": "1",
        "FULL_EDIT": "0", "OUT": str(tmp_path), "PYTHON": sys.executable,
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(ROOT / "tests" / "gpu_check.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check: OK" in done.stdout and "device: cpu" in done.stdout
    latent = json.loads((tmp_path / "latent.json").read_text())
    native = {torch.bfloat16: "bf16", torch.float32: "fp32"}[
        bench_latent.latent_models.dtype_for("auto", torch.device("cpu"))
    ]
    assert latent["precision"] == native and latent["edit_measured_s"] is None
    assert "guided step" in done.stdout and "peak RSS" in done.stdout


@pytest.mark.skipif(
    not (bench_latent.LATENT_CONFIGS / "sd15").is_dir(), reason="no shipped sd15 configuration"
)
def test_sd15_is_built_at_its_shapes_only_the_parts_needed_taking_memory():
    cpu = torch.device("cpu")
    pipe = bench_latent.random_pipeline("sd15", cpu, torch.float32, need=("text",))
    assert (pipe.native, pipe.vae_factor, pipe.factor) == (512, 8, 64)
    assert pipe.unet.config.cross_attention_dim == 768 and not pipe.inpaint
    assert {p.device.type for p in pipe.unet.parameters()} == {"meta"}
    params = list(pipe.text_encoder.parameters())
    assert {p.device.type for p in params} == {"cpu"} and sum(p.numel() for p in params) > 1e8
    with torch.inference_mode():
        out = bench_latent.latent.embed(pipe, ["", "a stone fountain"])
    assert out.shape == (2, 77, 768) and torch.isfinite(out).all() and 0.1 < out.std() < 10
