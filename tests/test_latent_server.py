"""The latent method served: hello says which settings it takes, admission refuses the others
and LCM without LCM weights, and a job ends with its ranked variants, over real sockets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import latent_models
from engine.methods import latent
from engine.models import load_clip
from engine.serve.local import LocalExecutor
from engine.serve.pool import Pool
from engine.serve.server import Server
from engine.shared import protocol, request
from engine.shared.client import EngineError
from tests.helpers.engine import client, engines, host_picture, run_all

CPU = torch.device("cpu")
QUICK = {"steps": 6, "variants": 2, "seed": 4}


@pytest.fixture(scope="module")
def tiny_latent() -> latent.Latent:
    return latent.Latent(latent_models.tiny(CPU), load_clip("tiny", CPU))


@pytest.fixture
def engine(tiny_latent):
    pool = Pool.serving("tiny-latent", tiny_latent)
    yield from engines(lambda endpoint, **o: Server(LocalExecutor(pool), endpoint, **o))


def test_hello_names_the_method_and_the_settings_it_takes(engine):
    server = engine()
    with client(server.endpoint) as c:
        info = c.hello()
    assert info["method"] == "latent" and info["image_size"] == 64
    assert "random weights" in info["models"]
    assert set(info["settings"]) == set(request.taken_by("latent"))
    assert "negative_prompt" in info["settings"] and "augmentations" not in info["settings"]


def test_a_job_ends_with_ranked_variants_that_keep_the_outside(engine):
    server = engine()
    rgba, mask = host_picture(64, 64, (20, 16, 30, 24))
    with client(server.endpoint) as c:
        settings = QUICK | {"negative_prompt": "blue", "scheduler": "ddim"}
        job = c.submit(rgba, 64, 64, mask, "a red ball", settings)
        run_all([c], [job])
    assert job.state == "done" and [v.rank for v in job.variants] == [1, 2]
    assert job.total == 4 and job.plan["refine"] is None  # 75% of 6 DDIM steps
    picture = np.frombuffer(rgba, np.uint8).reshape(64, 64, 4)
    for v in job.variants:
        layer = np.frombuffer(v.rgba, np.uint8).reshape(v.height, v.width, 4)
        assert (v.x, v.y, v.width, v.height) == (20, 16, 30, 24)
        assert np.all(layer[..., 3] == 255)  # the whole box selected, nothing beyond it
        assert np.abs(layer[..., :3].astype(int) - picture[16:40, 20:50, :3]).mean() > 3


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"augmentations": 2}, "augmentations"),  # the pixel method's
        ({"scheduler": "lcm"}, "scheduler"),  # no LCM weights in tiny-latent
        ({"guidance": 31}, "guidance"),
        ({"negative_prompt": 3}, "negative_prompt"),
    ],
)
def test_settings_the_model_cannot_take_are_refused_naming_them(engine, settings, field):
    server = engine()
    rgba, mask = host_picture()
    with client(server.endpoint) as c:
        with pytest.raises(EngineError) as refused:
            c.submit(rgba, 64, 64, mask, "x", QUICK | settings)
        assert refused.value.code == protocol.BAD_FIELD and field in refused.value.message
        job = c.submit(rgba, 64, 64, mask, "x", QUICK)  # and the engine serves on
        run_all([c], [job])
    assert job.state == "done"


def test_the_engine_refuses_what_a_client_did_not_check(engine):
    """A client that skips its own check (an older plug-in) still gets the engine's refusal."""
    server = engine()
    rgba, mask = host_picture()
    with client(server.endpoint) as c:
        c.hello()
        c.info["method"] = "pixel"  # the client believes it talks to a pixel engine
        with pytest.raises(EngineError) as refused:
            c.submit(rgba, 64, 64, mask, "x", QUICK | {"guidance_mode": "fast"})
    assert refused.value.code == protocol.BAD_FIELD
    assert "latent method does not take guidance_mode" in refused.value.message
