"""Command line: `python -m engine edit|serve|keys|bench|doctor|demo-train|demo-ablation|demo-obeys
...`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

MODELS_HELP = (
    "the pixel method's demo | adm256 | adm512 | tiny, or the latent method's demo-latent | sd15 "
    "| sd15-inpaint | sd21-base | sd21 | sd2-inpaint | tiny-latent | a diffusers folder | a "
    ".safetensors/.ckpt file (tiny and tiny-latent are random weights: noise)"
)


def _add_model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    from engine.devices import CHOICES

    if several:
        p.add_argument(
            "--model", action="append", help=f"a model to serve, again for more: {MODELS_HELP}. "
            "Default: every model installed that loads (the per-user models folder, --model-dir, "
            "the demo models), the best the default",
        )  # fmt: skip
        p.add_argument(
            "--model-dir", action="append", default=[], metavar="DIR", help="a folder of "
            "checkpoints to serve too (ComfyUI's models/checkpoints, A1111's "
            "models/Stable-diffusion), again for more; with no --model",
        )  # fmt: skip
    else:
        p.add_argument(
            "--model", help=f"{MODELS_HELP}. Default: the best model installed; with --engine, "
            "the engine's default",
        )  # fmt: skip
    p.add_argument("--unet-checkpoint", help="a guided-diffusion state dict for --model")
    p.add_argument("--lora", help="a LoRA file fused into a latent model's UNet (an LCM-LoRA "
                   "makes --scheduler lcm available)")  # fmt: skip
    p.add_argument("--clip", help="NAME[:PRETRAINED_OR_FILE] (default: the model's own CLIP)")
    p.add_argument("--device", default="auto", choices=CHOICES, help="default: the first GPU found")


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    """One option a setting of the request schema, named, typed and bounded by it."""
    from engine.shared.request import FIELDS

    for f in FIELDS:
        flag, default = "--" + f.name.replace("_", "-"), f.default
        shown = "none" if default is None else repr(default) if default == "" else default
        if f.name == "steps":  # each method's (and the latent one's scheduler's) own
            default, shown = (
                None,
                "the method's: 100 for the pixel one, 25 / 50 / 6 with the "
                "latent one's DPM++ / DDIM / LCM",
            )
        methods = "" if len(f.methods) > 1 else f"; the {f.methods[0]} method's"
        # argparse formats help with %: the schema's "75%" would break --help
        text = f"{f.help} ({f.range_text()}; default {shown}{methods})".replace("%", "%%")
        if f.kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type=f.kind, default=default, choices=f.choices or None, help=text)


def _settings(args: argparse.Namespace, method: str):
    """The checked settings from the options, which are named after its fields, for `method`
    (the one --model names): another method's settings are refused, its defaults filled."""
    from engine.shared import request

    values = {f.name: getattr(args, f.name) for f in request.FIELDS}
    if values["steps"] is None:
        del values["steps"]
    return request.check(values, method=method)


def _read_inputs(image_path: str, mask_path: str):
    import numpy as np
    from PIL import Image

    with Image.open(image_path) as im:
        if im.mode not in ("RGB", "RGBA"):
            raise ValueError(
                f"{image_path}: the image must be 8-bit RGB or RGBA, not mode {im.mode}"
            )
        image = np.asarray(im).copy()
    with Image.open(mask_path) as m:
        mask = np.asarray(m.convert("L")).copy()
    return image, mask


def cmd_edit(args: argparse.Namespace) -> int:
    if args.previews and not args.engine:
        raise ValueError("--previews needs --engine: previews come from a running engine")
    from tqdm import tqdm

    from engine import region
    from engine.methods import loading

    image, mask = _read_inputs(args.image, args.mask)
    region.check_inputs(image, mask)  # before minutes of model loading
    if args.engine:
        from engine.shared.client import ClientError

        try:
            made, settings, planned, variants = _edit_remote(args, image, mask)
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _save_variants(Path(args.out), image, args.prompt, made, settings, planned, variants)
        return 0
    from engine import catalogue

    model = args.model or catalogue.default(catalogue.installed()).name
    settings = _settings(args, loading.method_of(model))
    method = loading.load(
        model, clip=args.clip, unet_checkpoint=args.unet_checkpoint, lora=args.lora,
        device=args.device, precision=settings.precision,
    )  # fmt: skip
    about = method.describe()
    print(f"models: {about.label} on {about.device}", file=sys.stderr)
    planned = about.plan(mask, settings)
    bar = tqdm(total=planned.total, desc="denoising", unit="step", file=sys.stderr)

    def on_step(done: int, _total: int, _previews) -> None:
        bar.update(done - bar.n)

    variants = method.run(image, mask, args.prompt, settings, on_step, plan=planned)
    bar.close()
    made = {"model": model, "weights": about.weights, "models": about.label}
    _save_variants(
        Path(args.out), image, args.prompt, made, settings.wire(about.method), planned.to_json(),
        variants,
    )  # fmt: skip
    return 0


def _save_variants(
    out: Path, image, prompt: str, made: dict, settings: dict, planned: dict, variants
) -> None:
    """rank-N.png (the image with variant N composited) and scores.json (which model made them,
    the settings away from their defaults, the edit's geometry `planned`), in-process or
    remote. `made`: the model's name, weights (real|demo|random) and models label."""
    from PIL import Image

    from engine import region
    from engine.shared.wording import made_by

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for v in variants:
        name = f"rank-{v.rank}.png"
        Image.fromarray(region.composite(image, v.rgba, v.box)).save(out / name)
        entries.append({"rank": v.rank, "file": name, "clip_distance": v.distance, "seed": v.seed})
    by = made_by(made["model"], made["weights"])
    scores = {"prompt": prompt, "made_by": by, **made, "settings": settings, **planned,
              "variants": entries}  # fmt: skip
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(f"{len(entries)} variants, best first, in {out}/ (rank-1.png ... scores.json)")


def _edit_remote(args: argparse.Namespace, image, mask):
    """The same edit through a running engine (`--engine`) on its model `--model` (default: the
    engine's), with the settings that model's method takes; returns (which model made it, the
    settings sent, the edit's geometry, variants)."""
    import numpy as np
    from tqdm import tqdm

    from engine.methods import Variant
    from engine.shared.client import connect
    from engine.shared.geometry import Rect

    height, width, channels = image.shape
    if args.previews:
        Path(args.previews).mkdir(parents=True, exist_ok=True)
    with connect(args.engine) as client:
        info = client.hello()
        model = client.model(args.model)  # its entry in hello: refused here when unknown
        print(f"model: {model['label']} on {info['device']} at {args.engine}", file=sys.stderr)
        settings = _settings(args, model["method"])
        job = client.submit(
            np.ascontiguousarray(image).tobytes(),
            width,
            height,
            np.ascontiguousarray(mask).tobytes(),
            args.prompt,
            settings.wire(),  # precision, recompute, batch: the engine's own, for its hardware
            image_format="RGBA8" if channels == 4 else "RGB8",
            previews={"every": args.preview_every} if args.previews else None,
            model=model["name"],
        )
        bar = tqdm(total=settings.steps_run, desc="denoising", unit="step", file=sys.stderr)

        def on_event(event) -> None:
            if event.type == "progress":
                bar.total = event.total  # the refinement's steps join the count
                bar.update(event.step - bar.n)
                for p in event.previews:  # as the engine sent them: PNG bytes
                    name = f"step-{p.step:04d}-variant-{p.variant}.png"
                    (Path(args.previews) / name).write_bytes(p.png)

        client.wait(job, on_event=on_event)
        bar.close()
    variants = [
        Variant(
            rank=v.rank,
            box=Rect(v.x, v.y, v.width, v.height),
            rgba=np.frombuffer(v.rgba, np.uint8).reshape(v.height, v.width, 4),
            distance=v.distance,
            seed=v.seed,
        )
        for v in job.variants
    ]
    made = {"model": job.model, "weights": job.weights, "models": job.models}
    return made, settings.wire(), job.plan, variants


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.serve.cli import serve

    return serve(args)


def cmd_keys(args: argparse.Namespace) -> int:
    from engine.keys import main

    return main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.methods import loading
    from engine.shared.request import LATENT

    latent = loading.method_of(args.model) == LATENT  # its edit against the pixel method's
    if latent:
        from engine.bench_latent import run_bench, table
    else:
        from engine.bench import run_bench, table
    if args.steps is None:
        args.steps = 3 if latent else 2
    result = run_bench(args)
    print(json.dumps(result) if args.json else table(result))
    return 0


# commands with parsers of their own: everything after the name is theirs
PASSTHROUGH = {
    "demo-train": "engine.demo.train",
    "demo-ablation": "engine.demo.ablation",
    "demo-sharpness": "engine.demo.sharpness",
    "demo-obeys": "engine.demo.obeys",
    "bench-models": "engine.bench_models",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from engine.devices import keep_freed_host_memory

    keep_freed_host_memory()  # before any thread starts or any model loads
    if argv[:2] == ["demo-train", "latent"]:  # demo-latent: a model of its own, own options
        return importlib.import_module("engine.demo.train_latent").main(argv[2:])
    if argv and argv[0] in PASSTHROUGH:
        return importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
    from engine.accel import RECOMPUTE
    from engine.bench_latent import ATTENTION
    from engine.devices import PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit an image inside a mask from a text prompt")
    p.add_argument("image", help="8-bit RGB or RGBA image")
    p.add_argument("--mask", required=True, help="mask image, same size (white = edit)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="folder for rank-N.png and scores.json")
    p.add_argument(
        "--engine", metavar="tcp://HOST:PORT", help="edit through a running engine (`serve`)"
    )
    p.add_argument(
        "--previews",
        metavar="DIR",
        help="with --engine: write each preview received as DIR/step-NNNN-variant-I.png",
    )
    p.add_argument(
        "--preview-every", type=int, default=1, help="ask for a preview at most every N steps"
    )
    _add_model_args(p)
    _add_settings_args(p)
    p.set_defaults(run=cmd_edit)

    p = sub.add_parser("serve", help="serve edits to the plug-ins (docs/protocol.md)")
    p.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5557",
        help="where to listen (default tcp://127.0.0.1:5557); a non-loopback address needs keys",
    )
    _add_model_args(p, several=True)
    p.add_argument("--keys", help="key folder from `keys` (default: the user config dir)")
    p.add_argument("--curve", action="store_true", help="require CURVE keys on loopback too")
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=5.0,
        help="seconds of client silence that cancel its jobs (default 5)",
    )
    p.add_argument("--max-side", type=int, default=4096, help="largest image side accepted")
    p.add_argument("--max-queue", type=int, default=32, help="most jobs queued at once")
    p.add_argument(
        "--max-client-queue", type=int, default=4, help="most jobs queued at once per client"
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        help="GiB for the models kept loaded plus the jobs (default: 80%% of the free memory "
        "before any model loads)",
    )
    p.add_argument(
        "--max-job-minutes",
        type=float,
        help="refuse a job estimated longer (from the step times measured), and end one "
        "running longer with an error (default: no limit)",
    )
    p.add_argument(
        "--step-times",
        metavar="FILE|off",
        help="where the step times measured for the plug-ins' estimates are kept across "
        "restarts (default: step-times.json in the user state dir; off: not kept)",
    )
    g = p.add_argument_group("cluster (pip install .[cluster]; README: several GPUs and machines)")
    g.add_argument(
        "--cluster",
        metavar="ADDRESS|auto",
        help="run the jobs on Ray Serve replicas: the Ray cluster at ADDRESS (HOST:6379, from "
        "`ray start --head`), or `auto`: a Ray started here for this engine",
    )
    g.add_argument(
        "--replicas",
        type=int,
        help="replicas, each loading the models (default: one per GPU of the cluster, else 1)",
    )
    g.add_argument(
        "--app",
        default="blended-diffusion",
        help="the Serve application's name: one per engine sharing a cluster (default %(default)s)",
    )
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("keys", help="create CURVE key pairs for a remote engine")
    p.add_argument("--dir", help="key folder (default: the user config dir)")
    p.add_argument("--client", default="client", help="name of the client key pair")
    p.set_defaults(run=cmd_keys)

    p = sub.add_parser("bench", help="time a guided step: official formulation vs the engine "
                       "(a latent model: its edit against the pixel method's)")  # fmt: skip
    _add_model_args(p)
    p.add_argument("--steps", type=int, help="timed steps of each (default 2; latent: 3)")
    p.add_argument("--batch", default="1", help="engine batch sizes, e.g. 1,4 (official: 1)")
    p.add_argument("--guidance-mode", default="full", choices=["full", "fast"])
    p.add_argument("--guidance-every", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--recompute", default="auto", choices=RECOMPUTE)
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-part timings")
    p.add_argument("--refine", help="also time the refinement pass at these scales, e.g. 2,4")
    p.add_argument(
        "--isa", default="native", choices=["native", "avx2"],
        help="avx2: run this CPU as one without AVX-512 and bf16 (torch's and oneDNN's kernels)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON line")
    g = p.add_argument_group("latent models (engine/bench_latent.py)")
    g.add_argument("--pixel-model", default="adm256", help="the pixel model whose edit the "
                   "latent one's is set against (default adm256)")  # fmt: skip
    g.add_argument("--full-edit", action="store_true", help="also run the default edit end to end")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="the VAE in channels-last memory format too (the UNet always is, as "
                   "the engine runs it)")  # fmt: skip
    g.add_argument("--attention", default="engine", choices=ATTENTION,
                   help="the engine's (default: latent.layout), torch's SDPA, SDPA's math "
                   "backend, or diffusers' classic processor")  # fmt: skip
    p.set_defaults(run=cmd_bench)

    sub.add_parser("demo-train", help="train the demo world's CLIP or UNet, or demo-latent")
    sub.add_parser("demo-ablation", help="the paper's claims measured in the demo world")
    sub.add_parser("demo-sharpness", help="the refinement pass measured in the demo world")
    sub.add_parser("bench-models", help="two models over the memory budget: peak RSS")
    sub.add_parser("demo-obeys", help="demo-latent and the pixel demo obeying prompts, measured")

    from engine import doctor  # light: imports torch only when it runs

    p = sub.add_parser(
        "doctor",
        help="versions, device, weights, plug-ins, a running engine",
        description=doctor.__doc__,
    )
    doctor.add_arguments(p)
    p.set_defaults(run=doctor.run)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # bad input or missing files: a message, not a trace
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
