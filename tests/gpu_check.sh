#!/usr/bin/env bash
# The GPU check: both methods' benches on the device, random weights, no network, within 10 min.
#
#   tests/gpu_check.sh       # CUDA (fp16): the pixel method at adm256, the latent one at sd15
#   DEVICE=cpu MODEL_PIXEL=tiny MODEL_LATENT=tiny-latent STEPS=1 tests/gpu_check.sh  # smoke, CPU
#
# Prints the device's name, each bench's step times and the peak device memory of each measuring
# child (torch.cuda.max_memory_allocated; on a CPU the peak RSS). The latent bench also runs the
# default 4-variant edit end to end (FULL_EDIT=0: not). The benches' JSON lines are kept in $OUT
# (default: a new temporary folder). Exits non-zero when the device, either bench, or the
# summary fails, or a command runs past its time limit (each has one, 580 s in all; a bench past
# its limit is stopped with its children: timeout signals the process group).
# Environment: PYTHON (default .venv/bin/python), DEVICE (cuda), MODEL_PIXEL (adm256),
# MODEL_LATENT (sd15), STEPS (3), FULL_EDIT (1), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
MODEL_PIXEL=${MODEL_PIXEL:-adm256}
MODEL_LATENT=${MODEL_LATENT:-sd15}
STEPS=${STEPS:-3}
FULL_EDIT=${FULL_EDIT:-1}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
failed=0

echo "== device ($DEVICE)"
if ! timeout 30 "$PY" - "$DEVICE" <<'EOF'; then
import sys

import torch

from engine import devices

dev = devices.resolve(sys.argv[1])  # refuses a device that is missing or lacks an operation
print(f"device: {devices.identity(dev)}; torch {torch.__version__}, {devices.build()}")
EOF
    echo "FAIL: no usable device '$DEVICE'"
    exit 1
fi

echo "== pixel method: bench --model $MODEL_PIXEL --steps $STEPS"
timeout -k 10 230 "$PY" -m engine bench --model "$MODEL_PIXEL" --device "$DEVICE" \
    --steps "$STEPS" --json >"$OUT/pixel.json"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "FAIL: the pixel bench, exit status $rc (124: past its 230 s)"
    failed=1
fi

echo "== latent method: bench --model $MODEL_LATENT --steps $STEPS"
extra=()
[ "$FULL_EDIT" = 1 ] && extra+=(--full-edit)
timeout -k 10 290 "$PY" -m engine bench --model "$MODEL_LATENT" --device "$DEVICE" \
    --steps "$STEPS" --pixel-model "$MODEL_PIXEL" "${extra[@]}" --json >"$OUT/latent.json"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "FAIL: the latent bench, exit status $rc (124: past its 290 s)"
    failed=1
fi

echo "== results (JSON in $OUT)"
timeout 10 "$PY" - "$OUT" <<'EOF' || failed=1
import json
import sys
from pathlib import Path


def last_line(name):
    path = Path(sys.argv[1]) / name
    text = path.read_text().strip() if path.is_file() else ""
    return json.loads(text.splitlines()[-1]) if text else None


pixel, latent = last_line("pixel.json"), last_line("latent.json")
if pixel:
    print(f"pixel {pixel['model']} on {pixel['device']} ({pixel['precision']}): official step "
          f"{pixel['reference_step_s']} s {pixel['reference_step_times_s']}, engine step "
          f"{pixel['engine_step_s']} s {pixel['engine_step_times_s']}, ratio {pixel['ratio']}")
if latent:
    gpu, rss = latent["device_peak_mb"], latent["peak_rss_mb"]
    print(f"latent {latent['model']} at {latent['side']} px on {latent['device_name']} "
          f"({latent['precision']}): guided step {latent['step_s']} s {latent['step_times_s']} "
          f"(UNet batch {latent['unet_batch']}), lcm step {latent['lcm_step_s']} s, text "
          f"{latent['text_s']} s, VAE encode {latent['encode_s']} s, decode {latent['decode_s']} s")
    measured = latent["edit_measured_s"]
    print(f"latent edit {latent['edit_s']} s from its parts"
          + (f", {measured} s end to end" if measured is not None else "")
          + f"; lcm edit {latent['lcm_edit_s']} s; pixel edit ({latent['pixel_model']}) "
          f"{latent['bd_edit_s']} s; ratio {latent['ratio']}, lcm ratio {latent['lcm_ratio']}")
    for part, mb in rss.items():
        device = f"peak device memory {gpu[part]} MB, " if part in gpu else ""
        print(f"  {part:9} {device}peak RSS {mb} MB")
    if latent["device"].startswith("cuda") and not gpu:
        sys.exit("FAIL: no peak GPU memory reported")
sys.exit(0 if pixel and latent else 1)
EOF

if [ "$failed" -ne 0 ]; then
    echo "gpu_check: FAILED"
    exit 1
fi
echo "gpu_check: OK"
