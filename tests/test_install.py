"""install.py into fake homes laid out as Linux, Windows and macOS users have them.

Every run is a subprocess with --plugins-only (no venv) and an explicit host Python, so no
network is needed, except the test that fetches a real pyzmq wheel from PyPI. The models'
options run through this checkout's venv (this interpreter's) into a temporary models folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from installer import cli
from installer.kritarc import disable_text, enable_text
from installer.layout import Layout, layout_for
from installer.pyzmq import wheel_fits
from tests.helpers.engine import free_port
from tests.helpers.install import (
    INSTALL,
    PLACES,
    SCRUB,
    P,
    fake_checkout,
    fake_wheel,
    install_env,
    run_install,
    snapshot,
    user_home,
)


@pytest.mark.parametrize("layout", ["linux", "windows", "macos"])
def test_install_update_uninstall_in_each_layout(tmp_path, layout):
    src = fake_checkout(tmp_path / "src")
    home = user_home(tmp_path / "home", layout)
    before = snapshot(home)
    krita, gimp, kritarc = (home / p for p in PLACES[layout])

    out = run_install(home, layout, source=src).stdout
    assert str(krita / P) in out and str(gimp / P) in out
    assert (krita / f"{P}.desktop").is_file()
    assert (krita / P / "extension.py").read_text() == "# krita\n"
    main = gimp / P / f"{P}.py"
    assert main.stat().st_mode & 0o777 == 0o755
    assert not (gimp / P / "__pycache__").exists()
    for folder in (krita / P, gimp / P):
        lib = folder / "_lib"
        assert sorted(p.name for p in (lib / "engine").iterdir()) == ["__init__.py", "shared"]
        assert sorted(p.name for p in (lib / "engine/shared").iterdir()) == [
            "client.py", "protocol.py"
        ]
        manifest = json.loads((lib / "INSTALLED.json").read_text())
        assert manifest["pyzmq"]["bundled"] is False
        assert not (lib / "zmq").exists()
    assert "enable_blended_diffusion=true" in kritarc.read_text()
    assert "enable_other=true" in kritarc.read_text() and "level=2" in kritarc.read_text()

    # update in place: a file gone from the source goes from the install, a new one comes
    (src / f"plugin_krita/{P}/old.py").unlink()
    (src / f"plugin_krita/{P}/new.py").write_text("# new\n")
    (src / f"plugin_gimp/{P}/ui/dialog.py").unlink()
    run_install(home, layout, source=src)
    assert not (krita / P / "old.py").exists() and (krita / P / "new.py").is_file()
    assert not (gimp / P / "ui").exists()
    assert (krita / "other" / "__init__.py").read_text() == "# the user's\n"
    assert kritarc.read_text().count("enable_blended_diffusion") == 1

    # the host ran the plug-in: bytecode next to our files goes with them
    (krita / P / "__pycache__").mkdir()
    (krita / P / "__pycache__" / "new.cpython-310.pyc").write_bytes(b"")
    run_install(home, layout, "--uninstall", source=src)
    assert snapshot(home) == before


def test_uninstall_from_an_empty_home_leaves_it_empty(tmp_path):
    src = fake_checkout(tmp_path / "src")
    home = tmp_path / "home"
    home.mkdir()
    run_install(home, "linux", source=src)
    assert (home / ".config/kritarc").read_text() == "[python]\nenable_blended_diffusion=true\n"
    run_install(home, "linux", "--uninstall", source=src)
    assert list(home.iterdir()) == []


def test_a_disabled_entry_in_kritarc_is_restored_on_uninstall(tmp_path):
    src = fake_checkout(tmp_path / "src")
    home = tmp_path / "home"
    kritarc = home / "AppData/Local/kritarc"
    kritarc.parent.mkdir(parents=True)
    kritarc.write_bytes(b"[python]\r\nenable_blended_diffusion=false\r\n[X]\r\na=1")
    before = snapshot(home)
    run_install(home, "windows", source=src)
    assert kritarc.read_bytes() == b"[python]\r\nenable_blended_diffusion=true\r\n[X]\r\na=1\r\n"
    run_install(home, "windows", "--uninstall", source=src)
    assert snapshot(home) == before


def test_xdg_folders_and_explicit_folders_are_honoured(tmp_path):
    src = fake_checkout(tmp_path / "src")
    home = tmp_path / "home"
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "conf")}
    run_install(home, "linux", source=src, env=env)
    assert (tmp_path / "data/krita/pykrita" / P / "_lib/INSTALLED.json").is_file()
    assert (tmp_path / "conf/GIMP/3.0/plug-ins" / P / f"{P}.py").is_file()
    assert (tmp_path / "conf/kritarc").is_file() and not home.exists()

    run_install(
        home, "linux", "--krita-dir", str(tmp_path / "k"), "--gimp-dir", str(tmp_path / "g"),
        source=src,
    )  # fmt: skip
    assert (tmp_path / "k" / P / "extension.py").is_file()
    assert (tmp_path / "g" / P / f"{P}.py").is_file()


def test_dry_run_changes_nothing(tmp_path):
    src = fake_checkout(tmp_path / "src")
    home = user_home(tmp_path / "home", "linux")
    before = snapshot(home)
    out = run_install(home, "linux", "--dry-run", source=src).stdout
    assert "would install" in out and "would enable it in" in out and "nothing was changed" in out
    assert snapshot(home) == before
    run_install(home, "linux", source=src)
    installed = snapshot(home)
    out = run_install(home, "linux", "--uninstall", "--dry-run", source=src).stdout
    assert "would remove" in out and snapshot(home) == installed


def test_a_bundled_wheel_is_unpacked_into_lib_and_removed_with_the_plugin(tmp_path):
    src = fake_checkout(tmp_path / "src", top=False)
    home = tmp_path / "home"
    wheel = fake_wheel(tmp_path)
    r = run_install(home, "linux", "--host-python", "3.11", "--pyzmq-wheel", str(wheel), source=src)
    assert "__init__.py does not exist" in r.stderr  # skipped with a warning, others copied
    for root in (home / PLACES["linux"][0], home / PLACES["linux"][1]):
        lib = root / P / "_lib"
        assert (lib / "zmq/__init__.py").read_text() == "FAKE = True\n"
        assert (lib / "pyzmq.libs/libzmq.so.5").is_file()
        assert sorted(p.name for p in (lib / "engine").iterdir()) == ["shared"]
        pyzmq = json.loads((lib / "INSTALLED.json").read_text())["pyzmq"]
        assert pyzmq["bundled"] and pyzmq["wheel"] == wheel.name and pyzmq["python"] == "3.11"

    run_install(home, "linux", "--host-python", "system", source=src)  # now the host has it
    assert not (home / PLACES["linux"][1] / P / "_lib/zmq").exists()
    run_install(home, "linux", "--uninstall", source=src)
    assert not home.exists()  # it created even the home: all of it goes


def test_a_wheel_for_another_python_is_refused(tmp_path):
    src = fake_checkout(tmp_path / "src")
    wheel = fake_wheel(tmp_path, "cp312-abi3-win_amd64")
    r = run_install(
        tmp_path / "home", "windows", "--krita-python", "3.10", "--gimp-python", "3.12",
        "--pyzmq-wheel", str(wheel), source=src, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert "does not load in Python 3.10" in r.stderr


def test_missing_plugin_sources_fail_with_the_reason(tmp_path):
    src = fake_checkout(tmp_path / "src")
    shutil.rmtree(src / "plugin_gimp")
    r = run_install(tmp_path / "home", "linux", source=src, check=False)
    assert r.returncode == 1 and "the GIMP plug-in is missing" in r.stderr


def test_layouts_and_wheel_tags():
    home = Path("/h")
    assert layout_for("windows", home, {"APPDATA": "/r", "LOCALAPPDATA": "/l"}) == (
        Layout(Path("/r/krita/pykrita"), Path("/r/GIMP/3.0/plug-ins"), Path("/l/kritarc"))
    )
    assert layout_for("linux", home, {"XDG_DATA_HOME": "rel"}).krita == Path(
        "/h/.local/share/krita/pykrita"
    )  # a relative XDG value is ignored, as the spec says
    assert wheel_fits("pyzmq-27.3.0-cp310-cp310-win_amd64.whl", "3.10")
    assert not wheel_fits("pyzmq-27.3.0-cp310-cp310-win_amd64.whl", "3.11")
    assert wheel_fits("pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl", "3.13")
    assert not wheel_fits("pyzmq-27.3.0-cp312-abi3-win_amd64.whl", "3.10")


def test_kritarc_edits_undo_exactly():
    for text in ["", "a=1", "a=1\n", "[python]", "[python]\nx=1\n", "[General]\r\nb=2\r\n"]:
        enabled, record = enable_text(text)
        assert "enable_blended_diffusion=true" in enabled.splitlines()
        assert disable_text(enabled, record) == text, (text, enabled)


def python310() -> str | None:
    candidates = [shutil.which("python3.10")]
    candidates += glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10"))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


def test_install_py_runs_on_python_310(tmp_path):
    exe = python310()
    if exe is None:
        pytest.skip("no Python 3.10 here")
    src = fake_checkout(tmp_path / "src")
    cmd = [exe, str(INSTALL), "--plugins-only", "--source", str(src), "--home", str(tmp_path)]
    cmd += ["--platform-layout", "macos", "--host-python", "system"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / PLACES["macos"][1] / P / "_lib/INSTALLED.json").is_file()


def base_python311() -> str:
    """A Python 3.11 outside the venv (this venv has its own pyzmq)."""
    for exe in (getattr(sys, "_base_executable", None), "/usr/bin/python3.11"):
        if exe and os.path.exists(exe):
            return exe
    pytest.skip("no Python 3.11 outside the venv")


def test_a_real_pyzmq_wheel_from_pypi_imports_in_a_fresh_interpreter(tmp_path):
    """Network: pip downloads pyzmq for cp311 manylinux_2_28_x86_64 from PyPI."""
    if sys.version_info[:2] != (3, 11) or os.uname().machine != "x86_64":
        pytest.skip("checks the wheel with this machine's Python 3.11 on x86_64")
    src = fake_checkout(tmp_path / "src")
    home = tmp_path / "home"
    r = run_install(
        home, "linux", "--no-krita", "--host-python", "3.11",
        "--platform", "manylinux_2_28_x86_64", source=src,
    )  # fmt: skip
    assert "pyzmq-" in r.stdout and "manylinux_2_28_x86_64.whl unpacked" in r.stdout
    lib = home / PLACES["linux"][1] / P / "_lib"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import zmq;"
        "ctx = zmq.Context(); a = ctx.socket(zmq.PAIR); b = ctx.socket(zmq.PAIR);"
        "a.bind('inproc://t'); b.connect('inproc://t'); a.send(b'hi'); assert b.recv() == b'hi';"
        "print(zmq.__file__)"
    )
    r = subprocess.run(
        [base_python311(), "-I", "-c", code, str(lib)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(lib)


# -- the models -------------------------------------------------------------------------------

VENV = Path(sys.prefix)  # this checkout's engine venv: the tests run in it


def install_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(INSTALL), *args]
    return subprocess.run(cmd, env=install_env(env), capture_output=True, text=True, timeout=120)


def test_models_names_what_is_fetched_and_clip_always_comes(tmp_path):
    venv = str(tmp_path / "no-venv")
    fetch = f"{venv}/bin/python -m engine.weights fetch"
    r = install_py("--weights-only", "--dry-run", "--venv", venv)
    assert f"would run {fetch} sd15 adm256 clip\n" in r.stdout, r.stderr
    r = install_py("--weights-only", "--dry-run", "--venv", venv, "--models", "sd21-base,adm512")
    assert f"would run {fetch} sd21-base adm512 clip\n" in r.stdout, r.stderr
    r = install_py("--weights-only", "--dry-run", "--venv", venv, "--with-512")
    assert f"would run {fetch} sd15 adm256 adm512 clip\n" in r.stdout
    assert "--with-512 is deprecated: name adm512 in --models" in r.stderr
    r = install_py("--no-weights", "--models", "sd15")
    assert r.returncode == 2 and "this run fetches none" in r.stderr
    r = install_py("--remove-model", "sd21,adm512", "--dry-run", "--venv", venv)
    assert f"would run {venv}/bin/python -m engine.weights remove sd21 adm512\n" in r.stdout


def test_list_models_and_remove_model_through_the_engine_venv(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "512x512_diffusion.pt").write_bytes(b"a 512 model")
    env = {"BLENDED_DIFFUSION_MODELS": str(models), "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = install_py("--list-models", "--venv", str(VENV), env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert rows["adm512"].split()[1] == "unverified" and rows["sd15"].split()[1] == "missing"
    assert "CreativeML OpenRAIL-M" in rows["sd15"]
    assert r.stdout.endswith("without --models: sd15, adm256, clip\n")
    r = install_py("--remove-model", "adm512", "--venv", str(VENV), env=env)
    assert r.returncode == 0, r.stderr
    assert f"adm512: removed {models / '512x512_diffusion.pt'}" in r.stdout
    assert not (models / "512x512_diffusion.pt").exists()
    r = install_py("--list-models", "--venv", str(tmp_path / "no-venv"))
    assert r.returncode == 1 and "no engine venv at" in r.stderr


def cached_clip(hub: Path) -> None:
    """OpenAI's CLIP in a huggingface_hub cache, as a download leaves it (the blob named by its
    sha256)."""
    data = b"clip"
    repo = hub / "models--timm--vit_base_patch16_clip_224.openai"
    digest, commit = hashlib.sha256(data).hexdigest(), "0" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(data)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_model.safetensors").symlink_to(
        f"../../blobs/{digest}"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_without_network_the_plugins_install_and_the_models_missing_are_named(
    tmp_path, monkeypatch, capfd
):
    """No hub answers: sd15 is named as not fetched, CLIP (already there) is kept, the
    plug-ins are installed, and install.py exits non-zero. The engine's venv is this one."""
    for name in SCRUB:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(cli, "install_engine", lambda args, python: None)  # it is there
    cached_clip(tmp_path / "hub")
    src, home = fake_checkout(tmp_path / "src"), tmp_path / "home"
    args = ["--source", str(src), "--home", str(home), "--platform-layout", "linux"]
    args += ["--host-python", "system", "--venv", str(VENV), "--models", "sd15"]
    assert cli.main(args) == 1
    out, err = capfd.readouterr()
    for folder in PLACES["linux"][:2]:
        assert (home / folder / P / "_lib/INSTALLED.json").is_file()
    assert "clip: open_clip_model.safetensors present" in out and "==> done, but see below" in out
    assert "error: sd15: the hub's listing of stable-diffusion-v1-5" in err
    assert "not fetched: sd15 (see above)" in err
    again = "`python install.py --weights-only --models sd15,clip` fetches what is missing"
    assert err.rstrip().endswith(f"{again}; the rest is installed")
