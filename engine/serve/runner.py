"""Run one job with a loaded method: its progress (with previews when its client asked), and its
one terminal answer as frames, whatever happens in preparing, sampling, ranking or encoding.
The same code runs in the engine's worker thread (local.py) and in a cluster replica
(cluster.py)."""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from engine import devices, preview, region
from engine.methods import Diverged, Variant
from engine.serve.jobs import CANCELLED, DONE, FAILED, Cancelled, Job
from engine.serve.pool import Pool, Unavailable
from engine.shared import protocol
from engine.shared.protocol import Pixels


class Runner:
    def __init__(
        self,
        pool: Pool,
        log: Callable[[str], None],
        *,
        result_fields: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`pool`: the models, loaded as jobs need them; `result_fields`: what the result's
        header adds (a replica: its name); `clock`: what the previews' rate is measured with."""
        self.pool, self.log, self.clock = pool, log, clock
        self.result_fields = result_fields or {}

    def run(self, job: Job, progress: Callable[[list[bytes]], None]) -> tuple[str, list | None]:
        """(done|failed|cancelled, the terminal frames: None for cancelled, which the server
        words). `progress` gets each step's message; a cancel (job.cancel) is seen before
        every model forward and between the other phases."""

        def check() -> None:
            if job.cancel.is_set():
                raise Cancelled

        shown = {"step": 0, "t": -protocol.PREVIEW_INTERVAL}  # the last preview sent

        def on_step(done: int, total: int, previews: Callable) -> None:
            job.step, job.total = done, total
            check()
            fields: dict[str, Any] = {"job": job.id, "step": done, "total": total}
            frames: list[Pixels] = []
            asked, now = job.previews, self.clock()
            if (
                asked
                and done - shown["step"] >= asked["every"]
                and now - shown["t"] >= protocol.PREVIEW_INTERVAL
            ):
                shown.update(step=done, t=now)
                shown_now = previews(asked["max_side"])
                fields["previews"], frames = self._previews(shown_now)
                box = shown_now[0].box
                fields["box"] = {"x": box.x, "y": box.y, "width": box.width, "height": box.height}
            progress(protocol.encode("progress", fields, frames))

        def loading(stage: str) -> None:  # a model loads: seconds to minutes, said as such
            fields = {"job": job.id, "step": 0, "total": job.total, "stage": stage}
            progress(protocol.encode("progress", fields))

        s = job.settings
        device = None
        try:
            check()
            method = self.pool.acquire(job.model, job.cost, loading)
            device = self.pool.about(job.model).device
            check()
            variants = method.run(job.image, job.mask, job.prompt, s, on_step, check, plan=job.plan)
            check()
            return DONE, self._result(job, variants)
        except Cancelled:
            return CANCELLED, None
        except Unavailable as e:
            return FAILED, protocol.error(protocol.MODEL_UNAVAILABLE, str(e), job.id)
        except region.RegionError as e:
            return FAILED, protocol.error(protocol.BAD_INPUT, str(e), job.id)
        except Diverged as e:
            self.log(f"job {job.id}: {e}")
            return FAILED, protocol.error(protocol.NON_FINITE, str(e), job.id)
        except devices.OUT_OF_MEMORY:
            gc.collect()
            if device is not None:
                devices.free_cached_memory(device)
            self.log(f"job {job.id}: out of memory")
            message = (
                f"out of memory during the edit: lower variants ({s.variants}) or augmentations "
                f"({s.augmentations}), or free memory on the engine's machine"
            )
            return FAILED, protocol.error(protocol.OUT_OF_MEMORY, message, job.id)
        except Exception as e:
            self.log(f"job {job.id} failed: {traceback.format_exc()}")
            return FAILED, protocol.error(protocol.INTERNAL, f"the edit failed: {e}", job.id)

    @staticmethod
    def _previews(shown: list[preview.Preview]) -> tuple[list[dict], list[Pixels]]:
        """A progress message's `previews` entries and their PNG frames."""
        entries = [{"variant": p.variant, "seed": p.seed, "distance": p.distance} for p in shown]
        frames = [
            Pixels(p.rgba.shape[1], p.rgba.shape[0], "PNG", preview.encode_png(p.rgba),
                   name=f"preview-{p.variant}")
            for p in shown
        ]  # fmt: skip
        return entries, frames

    def _result(self, job: Job, variants: list[Variant]) -> list[bytes]:
        frames = [
            Pixels(v.box.width, v.box.height, "RGBA8", np.ascontiguousarray(v.rgba).tobytes(),
                   name=f"rank-{v.rank}")
            for v in variants
        ]  # fmt: skip
        entries = [
            {"rank": v.rank, "x": v.box.x, "y": v.box.y, "width": v.box.width,
             "height": v.box.height, "distance": float(v.distance), "seed": v.seed}
            for v in variants
        ]  # fmt: skip
        about = self.pool.about(job.model)
        fields = {"job": job.id, "model": job.model, "weights": about.weights,
                  "models": about.label, "variants": entries, **self.result_fields}  # fmt: skip
        return protocol.encode("result", fields, frames)
