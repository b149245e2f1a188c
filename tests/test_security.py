"""Loopback only by default; anything else needs CURVE with an allow folder (pyzmq's zmq.auth)."""

from __future__ import annotations

import os
import stat

import pytest

from engine import keys
from engine.__main__ import main
from engine.serve.server import BindRefused
from engine.shared.client import Client, EngineUnreachable, connect, default_key_dir, load_keys
from tests.helpers.engine import free_port, host_picture, local_server


def test_non_loopback_bind_without_keys_is_refused(tiny_models, tmp_path, capsys):
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    with pytest.raises(BindRefused, match="without CURVE"):
        local_server(tiny_models, endpoint)
    # the command refuses before loading any model when the key folder is empty
    assert main(["serve", "--endpoint", endpoint, "--keys", str(tmp_path)]) == 2
    assert "no engine key pair" in capsys.readouterr().err


def test_keys_command_makes_pairs_without_replacing_them(tmp_path):
    folder = tmp_path / "keys"
    assert main(["keys", "--dir", str(folder), "--client", "krita"]) == 0
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*.key*")}
    assert names == {
        "server.key",
        "server.key_secret",
        "krita.key",
        "krita.key_secret",
        "allowed/krita.key",
    }
    assert stat.S_IMODE(os.stat(folder / "server.key_secret").st_mode) == 0o600
    server_pub = (folder / "server.key").read_bytes()
    assert keys.create(folder, "gimp")  # a second client, the same server pair
    assert (folder / "server.key").read_bytes() == server_pub
    assert (folder / "allowed" / "gimp.key").is_file()


def test_curve_lets_allowed_keys_edit_and_unknown_keys_get_nothing(start_engine, tmp_path):
    folder, stranger = tmp_path / "keys", tmp_path / "stranger"
    keys.create(folder, "krita")
    keys.create(stranger, "mallory")  # a valid pair the engine never saw
    server = start_engine(curve=keys.load_server_keys(folder))  # CURVE forced on loopback

    allowed = connect(server.endpoint, key_dir=folder, key_name="krita", curve=True, timeout=30)
    with allowed as c:
        assert "tiny UNet" in c.hello()["models"]
        rgba, mask = host_picture(32, 32, (8, 8, 10, 10))
        job = c.submit(rgba, 32, 32, mask, "a red ball", {"steps": 3, "skip": 1, "variants": 1})
        c.wait(job, timeout=120)
    assert job.state == "done" and len(job.variants) == 1

    intruder = load_keys(stranger, "mallory")
    intruder["server_key"] = load_keys(folder, "krita")["server_key"]
    for options in (intruder, {}):  # an unknown key, and no CURVE at all
        with Client(server.endpoint, timeout=1.0, **options) as c:
            with pytest.raises(EngineUnreachable, match="engine unreachable at"):
                c.hello()


def test_clients_find_keys_where_the_keys_command_writes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENDED_DIFFUSION_KEYS", str(tmp_path / "k"))
    assert default_key_dir() == tmp_path / "k"
    assert main(["keys"]) == 0  # into the default folder
    assert (tmp_path / "k" / "server.key").is_file() and (tmp_path / "k" / "client.key").is_file()
    monkeypatch.setenv("BLENDED_DIFFUSION_KEYS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="server.key is missing"):  # before any traffic
        connect("tcp://127.0.0.1:1", curve=True)
