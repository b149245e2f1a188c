"""`python -m engine serve`: the options, the signals, and which executor runs the jobs (a
worker thread here, or Ray Serve replicas with --cluster)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from engine import keys, weights
from engine.keys import CurveKeys
from engine.methods import loading
from engine.serve import Executor
from engine.serve.local import LocalExecutor
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
    if args.memory_budget:
        out["memory_budget"] = int(args.memory_budget * 2**30)
    if args.max_job_minutes:
        out["max_job_seconds"] = args.max_job_minutes * 60
    return out


def _executor(args: Any) -> tuple[Executor, str]:
    """The executor `args` ask for, its method loaded, and where it runs (for the ready line)."""
    load_options = {"clip": args.clip, "unet_checkpoint": args.unet_checkpoint, "lora": args.lora}
    if not args.cluster:
        executor = LocalExecutor(loading.load(args.model, **load_options, device=args.device))
        return executor, str(executor.method.device)
    try:
        from engine.serve import cluster
    except ModuleNotFoundError as e:
        raise ValueError(
            f"--cluster needs Ray Serve ({e}): `python install.py --cluster`, or "
            "`pip install '.[cluster]'`"
        ) from None
    cluster.connect(args.cluster)
    handle, n = cluster.deploy(
        loading.load, {"model": args.model, **load_options}, replicas=args.replicas,
        device=args.device, name=args.app,
    )  # fmt: skip
    executor = cluster.ClusterExecutor(handle, n, app=args.app)
    return executor, f"{n} replicas, {executor.method.device}"


def serve(args: Any) -> int:
    """Load the method (here or on the replicas), bind, answer until SIGINT or SIGTERM, or
    until a cluster is lost."""
    curve = None
    if args.curve or not is_loopback(args.endpoint):
        curve = keys.load_server_keys(Path(args.keys) if args.keys else default_key_dir())
    check_endpoint(args.endpoint, curve)  # before minutes of model loading
    executor, where = _executor(args)
    server = Server(executor, args.endpoint, **options(args, curve))
    endpoint = server.bind()
    handle_signals(server)
    secured = ", CURVE" if server.curve else ""
    # what scripts and tests wait for
    print(f"engine ready at {endpoint} ({server.method.label} on {where}{secured})", flush=True)
    server.log(f"memory budget {server.memory_budget / 2**30:.1f} GiB, instance {server.instance}")
    server.run()
    if server.lost:
        print(f"engine stopped: {server.lost}", file=sys.stderr, flush=True)
        os._exit(1)  # Ray's own shutdown would wait for the cluster that is gone
    if args.cluster:
        from engine.serve import cluster

        cluster.release(args.app)
    print("engine stopped", flush=True)
    return 0
