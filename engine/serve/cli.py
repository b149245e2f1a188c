"""`python -m engine serve`: the options, the signals, and which executor runs the jobs (a
worker thread here, or Ray Serve replicas with --cluster)."""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

from engine import catalogue, devices, keys, weights
from engine.keys import CurveKeys
from engine.methods import loading
from engine.serve import Executor
from engine.serve.local import LocalExecutor
from engine.serve.pool import Pool, amount
from engine.serve.server import Server, check_endpoint
from engine.shared.client import default_key_dir
from engine.shared.protocol import Limits, is_loopback
from engine.steptime import FILE_NAME


def handle_signals(server: Server) -> None:
    """SIGINT and SIGTERM stop the engine (every job answered); a second one exits at once."""

    def on_signal(*_: object) -> None:
        if server.stopping:  # the second Ctrl+C: the user means it
            os.write(2, b"second signal: exiting now\n")
            os._exit(1)
        server.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def options(args: Any, curve: CurveKeys | None) -> dict[str, Any]:
    """`Server`'s options from `serve`'s arguments, whichever the executor."""
    limits = Limits(
        max_side=args.max_side, max_queue=args.max_queue, max_client_queue=args.max_client_queue
    )
    out = {"limits": limits, "keepalive_timeout": args.keepalive_timeout, "curve": curve}
    if args.step_times != "off":
        out["step_file"] = Path(args.step_times or weights.state_dir() / FILE_NAME)
    if args.max_job_minutes:
        out["max_job_seconds"] = args.max_job_minutes * 60
    return out


def entries(args: Any) -> list[catalogue.Entry]:
    """The models `serve` serves: those named, else every one installed (with --model-dir's)."""
    if args.model:
        if args.model_dir:
            raise ValueError("--model-dir adds to the models found when no --model is named")
        return catalogue.named(args.model)
    return catalogue.installed(Path(d) for d in args.model_dir)


def budget(args: Any) -> int:
    """Bytes for the models kept loaded plus the jobs: --memory-budget, else 80% of the
    device's free memory before any model loads."""
    if args.memory_budget:
        return int(args.memory_budget * 2**30)
    return int(0.8 * devices.free_bytes(devices.resolve(args.device)))


def _executor(args: Any, log: Any) -> tuple[Executor, str]:
    """The executor `args` ask for, its models checked, and where it runs (for the ready
    line)."""
    load_options = {"clip": args.clip, "unet_checkpoint": args.unet_checkpoint, "lora": args.lora}
    served = entries(args)
    if not args.cluster:
        load = partial(loading.load_entry, **load_options, device=args.device)
        pool = Pool(served, load, budget=budget(args), log=log)
        pool.survey()
        executor = LocalExecutor(pool)
        return executor, str(pool.about(pool.default).device)
    try:
        from engine.serve import cluster
    except ModuleNotFoundError as e:
        raise ValueError(
            f"--cluster needs Ray Serve ({e}): `python install.py --cluster`, or "
            "`pip install '.[cluster]'`"
        ) from None
    cluster.connect(args.cluster)
    given = int(args.memory_budget * 2**30) if args.memory_budget else None
    handle, n = cluster.deploy(
        served, load_options, budget=given, replicas=args.replicas, device=args.device,
        name=args.app,
    )  # fmt: skip
    executor = cluster.ClusterExecutor(handle, n, app=args.app)
    models = executor.models
    return executor, f"{n} replicas, {models.about(models.default).device}"


def serving_line(args: Any) -> str:
    """The log's first line: which models, and on a machine without weights that the demo
    models are what it serves (demonstrations, not the paper's models)."""
    if args.model:
        return f"serving the models named: {', '.join(args.model)}"
    served = entries(args)
    real = [e.name for e in served if e.rank in (catalogue.REAL_LATENT, catalogue.REAL_PIXEL)]
    if not real:
        return (
            "no model weights installed: serving the demo models "
            f"({', '.join(e.name for e in served)}: small models trained on coloured shapes, not "
            "the papers' models); `python install.py --models sd15` fetches Stable Diffusion 1.5"
        )
    return f"serving every model installed: {', '.join(e.name for e in served)}"


def serve(args: Any) -> int:
    """Load the method (here or on the replicas), bind, answer until SIGINT or SIGTERM, or
    until a cluster is lost."""
    curve = None
    if args.curve or not is_loopback(args.endpoint):
        curve = keys.load_server_keys(Path(args.keys) if args.keys else default_key_dir())
    check_endpoint(args.endpoint, curve)  # before minutes of model loading
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(serving_line(args))
    executor, where = _executor(args, log)
    server = Server(executor, args.endpoint, **options(args, curve), log=log)
    endpoint = server.bind()
    handle_signals(server)
    secured = ", CURVE" if server.curve else ""
    models = server.models
    default = models.about(models.default)
    names = ", ".join(m["name"] for m in models.listing() if not m["error"])
    # what scripts and tests wait for
    print(
        f"engine ready at {endpoint} (default {models.default}: {default.label}; serving "
        f"{names}; on {where}{secured})",
        flush=True,
    )
    server.log(f"memory budget {amount(server.memory_budget)}, instance {server.instance}")
    server.run()
    if server.lost:
        print(f"engine stopped: {server.lost}", file=sys.stderr, flush=True)
        os._exit(1)  # Ray's own shutdown would wait for the cluster that is gone
    if args.cluster:
        from engine.serve import cluster

        cluster.release(args.app)
    print("engine stopped", flush=True)
    return 0
