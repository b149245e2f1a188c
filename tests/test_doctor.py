"""`python -m engine doctor` in a fake home: weights, plug-ins, and no engine running."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

from engine import weights
from tests.helpers.engine import free_port
from tests.helpers.install import INSTALL, PLACES, ROOT, fake_checkout, fake_wheel, install_env


def test_doctor_reports_weights_plugins_and_no_engine(tmp_path):
    env = install_env(
        {
            "BLENDED_DIFFUSION_MODELS": str(tmp_path / "models"),
            "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "1",
        }
    )
    home = tmp_path / "home"
    src = fake_checkout(tmp_path / "src")
    wheel = fake_wheel(tmp_path, "cp310-cp310-win_amd64")
    install = [sys.executable, str(INSTALL), "--plugins-only", "--source", str(src)]
    install += ["--home", str(home), "--platform-layout", "windows", "--no-gimp"]
    install += ["--host-python", "3.10", "--pyzmq-wheel", str(wheel)]
    subprocess.run(install, env=env, check=True, capture_output=True, timeout=120)
    krita = home / PLACES["windows"][0] / "blended_diffusion"
    (krita / "extension.py").unlink()  # a damaged install

    models = tmp_path / "models"
    models.mkdir()
    data = b"a 512 model"
    (models / weights.ADM512.name).write_bytes(data)
    (models / f"{weights.ADM512.name}.sha256").write_text(hashlib.sha256(data).hexdigest())
    (models / weights.ADM256.name).write_bytes(b"not the real one")

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "engine", "doctor", "--home", str(home)]
    cmd += ["--platform-layout", "windows", "--endpoint", endpoint, "--timeout", "0.5"]
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    lines = {line[2:].split()[0]: line for line in out.splitlines() if line[:2] in ("  ", "! ")}
    assert lines["adm256"].startswith("! adm256") and "corrupt" in lines["adm256"]
    assert lines["clip"].startswith("! clip") and "missing" in lines["clip"]
    assert "ok: " in lines["adm512"] and "sha256 verified" in lines["adm512"]
    assert "optional" in lines["adm512-uncond"]
    assert "optional: `python install.py --weights-only --models sd15`" in lines["sd15"]
    assert f"! Krita            {krita} (installed" in out
    assert "1 installed file(s) missing, e.g. blended_diffusion/extension.py" in out
    assert "enabled in" in lines["kritarc"]
    assert "cp310-cp310-win_amd64.whl" in lines["pyzmq"] and "not testable here" in out
    assert "GIMP 3           not installed" in out
    assert f"no engine answering at {endpoint} within 0.5 s" in out
    for name in ("torch", "open_clip", "guided_diffusion", "pyzmq", "device", "threads"):
        assert name in lines, name
    assert elapsed < 60  # torch's import dominates; the engine check waits 0.5 s
    assert (models / ".sha256-cache.json").is_file()  # the next run hashes nothing again


def test_doctor_names_a_running_engines_default_and_models(start_engine, capsys):
    from engine import doctor

    server = start_engine()
    doctor.engine(doctor.Report(), server.endpoint, 5.0, None)
    line = capsys.readouterr().out.splitlines()[-1]
    assert f"answering at {server.endpoint}: " in line
    assert "default tiny" in line and "serving tiny" in line and "device cpu" in line
