"""`python -m engine bench-models`: an engine serving two models larger together than its memory
budget, jobs alternating between them; prints the models' sizes, the budget, the engine's RSS
idle (libraries imported, no model loaded, as it logs it) and its peak RSS over the whole run.

The promise measured: the pool evicts the least recently used model so that the resident models
plus the running job stay within the budget, so the peak stays within the budget plus the idle
engine. The budget defaults to 9/10 of the two models together (above either with its job).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _picture(side: int):
    import numpy as np

    y, x = np.mgrid[:side, :side]
    rgb = np.stack([x * 255 // side, y * 255 // side, np.full_like(x, 128)], -1).astype(np.uint8)
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    return rgb, mask


def run(models: list[str], jobs: int, budget_gb: float | None, side: int) -> dict:
    from engine.shared.client import Client

    log = Path(tempfile.mkdtemp()) / "serve.log"

    def serve(budget: float | None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "engine", "serve", "--endpoint", "tcp://127.0.0.1:*",
               "--device", "cpu", "--step-times", "off"]  # fmt: skip
        cmd += [a for m in models for a in ("--model", m)]
        cmd += ["--memory-budget", str(budget)] if budget else []
        with open(log, "w") as err:
            return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)

    def ready(proc: subprocess.Popen) -> str:
        line = proc.stdout.readline()
        if "engine ready at" not in line:
            raise RuntimeError(f"the engine did not start:\n{log.read_text()[-3000:]}")
        return line.split()[3]

    if budget_gb is None:  # the models' sizes first, from an engine that holds both
        proc = serve(None)
        try:
            with Client(ready(proc), timeout=60) as c:
                sizes = [m["bytes"] for m in c.hello()["available"]]
        finally:
            proc.terminate()
            proc.wait()
        budget_gb = 0.9 * sum(sizes) / 2**30
    proc = serve(budget_gb)
    rgb, mask = _picture(side)
    try:
        endpoint = ready(proc)
        after_start = peak_rss(proc.pid)
        idle = int(re.search(r"no model loaded: RSS .* \((\d+) bytes\)", log.read_text()).group(1))
        started = time.monotonic()
        with Client(endpoint, timeout=60, keepalive=0.5) as c:
            info = c.hello()
            for i in range(jobs):
                model = models[i % len(models)]
                settings = {"variants": 1, "seed": i}
                settings |= {"steps": 4} if c.model(model)["method"] == "latent" else {
                    "steps": 4, "skip": 1, "refine": False, "guidance_mode": "fast",
                    "augmentations": 2}  # fmt: skip
                job = c.submit(rgb.tobytes(), side, side, mask.tobytes(), "a red circle",
                               settings, image_format="RGB8", model=model)  # fmt: skip
                c.wait(job)
                if job.state != "done":
                    raise RuntimeError(f"job {i} on {model}: {job.state} {job.error}")
        peak = peak_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    text = log.read_text()
    budget = int(budget_gb * 2**30)
    return {
        "machine": platform.processor() or platform.machine(),
        "models": {m["name"]: round(m["bytes"] / MB, 1) for m in info["available"]},
        "budget_mb": round(budget / MB, 1),
        "jobs": jobs,
        "seconds": round(time.monotonic() - started, 1),
        "evictions": text.count("evicting "),
        "loads": len(re.findall(r"loaded in", text)),
        "idle_rss_mb": round(idle / MB, 1),
        "peak_rss_at_start_mb": round(after_start / MB, 1),  # checking each model, alone
        "peak_rss_mb": round(peak / MB, 1),
        "peak_over_idle_mb": round((peak - idle) / MB, 1),
        "within": peak <= budget + idle,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine bench-models", description=__doc__)
    p.add_argument("--model", action="append", help="default: demo and demo-latent")
    p.add_argument("--jobs", type=int, default=6, help="alternating between the models")
    p.add_argument("--memory-budget", type=float, help="GiB (default: 9/10 of both models)")
    p.add_argument("--side", type=int, default=128, help="the picture's side")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run(args.model or ["demo", "demo-latent"], args.jobs, args.memory_budget, args.side)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["within"] else 1


if __name__ == "__main__":
    sys.exit(main())
