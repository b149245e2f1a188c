"""The paper's claims in miniature, measured in the demo world.

Each setting edits a grey picture inside a square selection for a few prompts, several variants
each, with the same seeds. The demo CLIP then reads every variant's selection among the world's
18 captions: a variant obeys when it reads the prompt's colour (and shape). Roughness is the mean
absolute difference of neighbouring pixels inside the selection, in [-1, 1] units: adversarial
colour noise is rough, clean shapes are smooth.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from engine.demo.world import CAPTIONS
from engine.guidance import Guide
from engine.methods import Variant
from engine.methods.pixel import run_edit
from engine.models import Models, load_models
from engine.shared.request import Settings

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
SETTINGS: dict[str, dict] = {
    "guidance weight 0": {"guidance_weight": 0.0},
    "full, no augmentations": {"augmentations": 1},
    "full (default)": {},
    "fast (default)": {"guidance_mode": "fast"},
}


def canvas(size: int = 32, selection: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A plain grey picture and a centred square selection."""
    image = np.full((size, size, 3), 128, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    lo = (size - selection) // 2
    mask[lo : lo + selection, lo : lo + selection] = 255
    return image, mask


class Reader:
    """The demo CLIP as a judge: which of the world's captions a picture shows."""

    def __init__(self, models: Models):
        self.guide = Guide(models.clip, copies=1)
        self.size = models.clip.image_size
        with torch.no_grad():
            self.texts = torch.cat([self.guide.text(c) for c in CAPTIONS])

    @torch.no_grad()
    def read(self, rgb: np.ndarray) -> str:
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(self.texts.device) / 127.5 - 1
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        image = F.normalize(self.guide.embed(x), dim=-1)
        return CAPTIONS[int((image @ F.normalize(self.texts, dim=-1).T).argmax())]


def roughness(rgb: np.ndarray) -> float:
    x = rgb.astype(np.float32) / 127.5
    return float((np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2)


def judge(reader: Reader, prompt: str, variant: Variant) -> dict:
    rgb = variant.rgba[..., :3]
    caption = reader.read(rgb)
    colour, shape = prompt.split()[1:3]
    return {
        "read": caption,
        "colour": caption.split()[1] == colour,
        "colour_and_shape": caption == f"a {colour} {shape}",
        "roughness": roughness(rgb),
    }


def run(
    models: Models,
    variants: int,
    steps: int,
    skip: int,
    seed: int,
    settings: dict[str, dict],
    rounds: int = 1,
) -> list[dict]:
    """A row a setting: how often its variants (and its best one) obey the prompt, and the time
    an edit takes. A setting's own variants/steps/skip win over the arguments."""
    reader, (image, mask) = Reader(models), canvas()
    rows = []
    for name, overrides in settings.items():
        start, verdicts, best = time.perf_counter(), [], []
        for i in range(rounds * len(PROMPTS)):
            prompt = PROMPTS[i % len(PROMPTS)]
            edit = {"variants": variants, "steps": steps, "skip": skip} | overrides
            edit = Settings(seed=seed + 100 * i, **edit)
            result = run_edit(models, image, mask, prompt, edit)
            verdicts += [judge(reader, prompt, v) for v in result]
            best.append(verdicts[-len(result)])  # rank 1: the layer the artist sees
        rows.append(
            {
                "setting": name,
                "variants": len(verdicts),
                "colour_obeyed": sum(v["colour"] for v in verdicts) / len(verdicts),
                "colour_and_shape_obeyed": sum(v["colour_and_shape"] for v in verdicts)
                / len(verdicts),
                "best_colour_obeyed": sum(v["colour"] for v in best) / len(best),
                "roughness": float(np.mean([v["roughness"] for v in verdicts])),
                "seconds": round(time.perf_counter() - start, 1),
                "seconds_per_edit": round((time.perf_counter() - start) / len(best), 1),
            }
        )
    return rows


def preset_settings() -> dict[str, dict]:
    """The plug-ins' presets (engine/shared/settings.py) as the engine's settings."""
    from engine.shared.settings import PRESETS, request

    return {f"preset {name}": request({"prompt": "x", "preset": name}).settings for name in PRESETS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine demo-ablation", description=__doc__)
    p.add_argument("--variants", type=int, default=4, help="per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="MODE:W",
        help="also measure guidance MODE (full|fast) at weight W, e.g. fast:100 (repeatable)",
    )
    p.add_argument(
        "--presets",
        action="store_true",
        help="measure the plug-ins' presets (Draft, Paper) instead, each with its own steps",
    )
    p.add_argument("--rounds", type=int, default=1, help="times each prompt is edited")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    settings = preset_settings() if args.presets else dict(SETTINGS)
    for item in args.weight:
        mode, _, weight = item.partition(":")
        settings[f"{mode}, weight {weight}"] = {
            "guidance_mode": mode,
            "guidance_weight": float(weight),
        }
    models = load_models("demo", device="cpu")
    rows = run(models, args.variants, args.steps, args.skip, args.seed, settings, args.rounds)
    if args.json:
        print(json.dumps({"models": models.label, "prompts": PROMPTS, "rows": rows}))
        return 0
    print(models.label)
    print(
        f"{len(PROMPTS)} prompts x {args.variants} variants, {args.steps} steps, skip {args.skip}"
    )
    print(f"{'setting':26}{'colour':>8}{'+shape':>8}{'best':>8}{'rough':>8}{'s/edit':>8}")
    for r in rows:
        print(
            f"{r['setting']:26}{r['colour_obeyed']:>8.0%}{r['colour_and_shape_obeyed']:>8.0%}"
            f"{r['best_colour_obeyed']:>8.0%}{r['roughness']:>8.3f}{r['seconds_per_edit']:>8.1f}"
        )
    return 0
