"""`python -m tests.recording_engine serve ...`: the real engine, which also keeps what each job
it accepted received, for the real-host tests to check what a plug-in sent (the visible picture
of the artist's document), not only what came back.

BD_RECEIVED=DIR: for job N, DIR/N-image.npy (HxWx4 RGBA as the engine decoded it), DIR/N-mask.npy
and a line in DIR/jobs.jsonl (N, prompt, settings).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

from engine import __main__ as cli
from engine import server

JobClass = server.Job
count = itertools.count()


def recording_job(client, job_id, prompt, image, mask, settings, **kw):
    folder = Path(os.environ["BD_RECEIVED"])
    folder.mkdir(parents=True, exist_ok=True)
    n = next(count)
    np.save(folder / f"{n}-image.npy", image)
    np.save(folder / f"{n}-mask.npy", mask)
    line = {"n": n, "prompt": prompt, "settings": dataclasses.asdict(settings)}
    with open(folder / "jobs.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return JobClass(client, job_id, prompt, image, mask, settings, **kw)


def received(folder: Path, prompt: str) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(image, mask, settings) of every job received with `prompt`, in order."""
    path = folder / "jobs.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [
        (np.load(folder / f"{j['n']}-image.npy"), np.load(folder / f"{j['n']}-mask.npy"),
         j["settings"])
        for j in lines
        if j["prompt"] == prompt
    ]  # fmt: skip


if __name__ == "__main__":
    server.Job = recording_job  # the one place the server makes a job of a submit
    sys.exit(cli.main())
