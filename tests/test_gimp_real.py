"""The GIMP 3 plug-in inside real GIMP 3.0.4 (Debian trixie root: tests/hosts/trixie.py).

install.py puts the plug-in into a fresh profile, with a cp313 pyzmq wheel in its `_lib` (the
root's Python 3.13 has none, like users' GIMPs); a real engine runs here, reached over loopback
(the root shares the network namespace); tests/gimp_batch/check_edit.py runs inside GIMP and
writes a JSON verdict. The edit runs in the GUI under Xvfb with a D-Bus session, so GIMP's own
edit-undo action can be triggered; the failure paths run in gimp-console's batch mode.

Needs root (mounts); the root tarball is built once (about 90 s) and cached. Set GIMP_TEST_OUT
to a folder to keep the verdicts and the exported PNG of what the user sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.hosts import trixie, visible

REPO = Path(__file__).resolve().parents[1]
GIMP_PYTHON, PLATFORM = "3.13", "manylinux_2_28_x86_64"  # trixie's Python, its glibc's wheels
WHEELS = trixie.CACHE / "wheels"
HOME = "/home/artist"  # inside the root
BATCH = "/src/tests/gimp_batch/check_edit.py"
DEMO = REPO / "engine" / "demo" / "weights"
PLUGINS = ".config/GIMP/3.0/plug-ins"
KEEPALIVE = 2.0  # seconds of silence after which the engine drops a client's jobs

pytestmark = [
    pytest.mark.gimp,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("chroot"),
        reason="the GIMP root needs root (mount, chroot)",
    ),
]


def pyzmq_wheel() -> Path:
    """A pyzmq wheel for GIMP's Python in the root, downloaded once into the cache."""
    found = sorted(WHEELS.glob("pyzmq-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", GIMP_PYTHON, "--platform", PLATFORM, "-d", str(WHEELS),
             "--disable-pip-version-check", "pyzmq>=26"],
            check=True, capture_output=True,
        )  # fmt: skip
        found = sorted(WHEELS.glob("pyzmq-*.whl"))
    return found[-1]


@dataclass
class GimpRoot:
    top: Path
    home: Path  # outside path of HOME
    seconds: dict[str, float] = field(default_factory=dict)

    def batch(
        self, case: str, env: dict[str, str], gui: bool, label: str = "", during=None
    ) -> dict:
        """Run check_edit.py's `case` inside GIMP (`during(process)` meanwhile); its verdict,
        with GIMP's output on failure."""
        verdict = self.home / f"verdict-{case}.json"
        verdict.unlink(missing_ok=True)
        script = ["--batch-interpreter=python-fu-eval", "-b", f'exec(open("{BATCH}").read())']
        if gui:  # the full program: its actions (edit-undo) are on the session bus
            argv = ["dbus-run-session", "--", "xvfb-run", "-a", "-s", "-screen 0 1280x800x24",
                    "gimp-3.0", "-d", "-f", *script, "--quit"]  # fmt: skip
        else:
            argv = ["gimp-console-3.0", "-i", "-d", "-f", "-c", *script, "--quit"]
        env = {"HOME": HOME, "BD_CASE": case, "BD_VERDICT": f"{HOME}/{verdict.name}", **env}
        start = time.monotonic()
        code, output = run_in_root(self.top, argv, env, 300, during)
        self.seconds[f"gimp {label or case}"] = round(time.monotonic() - start, 1)
        assert verdict.is_file(), f"no verdict from GIMP (exit {code}):\n{output[-3000:]}"
        result = json.loads(verdict.read_text())
        keep(verdict)
        failed = [c for c in result["checks"] if not c["ok"]]
        assert result["ok"] and "error" not in result, (
            f"{result.get('error', '')}\nfailed: {json.dumps(failed, indent=1)}\n"
            f"GIMP's output:\n{output[-3000:]}"
        )
        return result


def run_in_root(top: Path, argv: list[str], env: dict[str, str], timeout: float, during=None):
    """trixie.run's command, in a session of its own so that a timeout kills GIMP, Xvfb and
    D-Bus too; output to a file, which never fills up and blocks GIMP as a pipe can."""
    full = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env}
    cmd = ["chroot", str(top), "env", "-i", *(f"{k}={v}" for k, v in full.items()), *argv]
    with tempfile.TemporaryFile("w+", errors="replace") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            if during:
                during(proc)
            proc.wait(timeout=timeout)
        except BaseException as e:  # a timeout, or `during` failed: stop all of GIMP
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.seek(0)
            what = (
                f"not finished within {timeout} s"
                if isinstance(e, subprocess.TimeoutExpired)
                else e
            )
            pytest.fail(f"GIMP stopped: {what}\nGIMP's output:\n{out.read()[-3000:]}")
        out.seek(0)
        return proc.returncode, out.read()


def keep(path: Path) -> None:
    if os.environ.get("GIMP_TEST_OUT") and path.is_file():
        out = Path(os.environ["GIMP_TEST_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / path.name)


@pytest.fixture(scope="module")
def gimp(tmp_path_factory) -> Iterator[GimpRoot]:
    """A fresh GIMP profile with the plug-in installed by install.py, in the unpacked root."""
    home = tmp_path_factory.mktemp("gimp-home")
    wheel = pyzmq_wheel()
    subprocess.run(
        [sys.executable, str(REPO / "install.py"), "--plugins-only", "--no-krita",
         "--gimp-dir", str(home / PLUGINS), "--gimp-python", GIMP_PYTHON,
         "--platform", PLATFORM, "--pyzmq-wheel", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert (home / PLUGINS / "blended_diffusion" / "_lib" / "zmq").is_dir()
    start = time.monotonic()
    with trixie.root({"/src": REPO, HOME: home}) as top:
        root = GimpRoot(top, home, {"root ready": round(time.monotonic() - start, 1)})
        yield root
    print(f"\nGIMP stage wall times (s): {root.seconds}")


@contextlib.contextmanager
def engine(model: str, log: Path) -> Iterator[str]:
    """`python -m engine serve --model MODEL` on a free loopback port, until the block ends;
    what its jobs received is kept in `received` beside the log (tests/recording_engine.py)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # a short keep-alive timeout: the cancel test waits for it
    args = ["--endpoint", endpoint, "--model", model, "--keepalive-timeout", str(KEEPALIVE)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.recording_engine", "serve", *args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "BD_RECEIVED": str(log.parent / "received")},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "engine ready" not in log.read_text():
            assert proc.poll() is None, f"the engine stopped:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no ready line:\n{log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with engine("tiny", log) as endpoint:
        yield endpoint, log


MODELS = [
    "tiny",
    pytest.param(
        "demo",
        marks=[
            pytest.mark.skipif(
                not ((DEMO / "demo_unet.pt").is_file() and (DEMO / "demo_clip.pt").is_file()),
                reason="the demo model is not trained yet (engine/demo/weights)",
            ),
        ],
    ),
]


@pytest.mark.parametrize("model", MODELS)
def test_edit_in_gimp_adds_layers_in_one_undo_step(gimp, tiny_engine, model: str, tmp_path: Path):
    png = gimp.home / f"edit-{model}.png"
    env = {"BD_PROMPT": "a red circle", "BD_UNDO": "dbus", "BD_EXPORT": f"{HOME}/{png.name}"}
    if model == "demo":
        env["BD_EXPECT"] = "red"  # the shapes world's model must paint the selection red
        env["BD_FIELDS"] = json.dumps({"preset": "draft", "seed": 7})  # the Draft preset obeys
    with contextlib.ExitStack() as stack:
        endpoint = tiny_engine[0]
        if model != "tiny":
            endpoint = stack.enter_context(engine(model, tmp_path / "engine.log"))
        verdict = gimp.batch("edit", {**env, "BD_ENDPOINT": endpoint}, True, f"edit {model}")
    assert png.is_file() and png.stat().st_size > 0
    keep(png)
    print(f"\n{model}: edit {verdict['edit_seconds']} s, best mean RGB {verdict['best_mean_rgb']}")


def test_gimp_sends_the_visible_picture_and_edits_with_a_group_active(gimp, tiny_engine):
    """A transparent layer over a painted background is active: the engine receives what the
    artist sees (the background through it), or with "This layer only" the layer alone; a
    group as the active layer works, the result right above it, and alone it sends what it
    shows on its own."""
    endpoint, log = tiny_engine
    env = {"BD_ENDPOINT": endpoint, "BD_SCENE": json.dumps(visible.SCENE)}
    gimp.batch("visible", env, gui=False)
    folder, size = log.parent / "received", (96, 80)  # check_edit.py's canvas
    report = visible.check_received(folder, size, green_columns=20)
    print("\nGIMP: the engine received", json.dumps(report))


def test_failures_in_gimp_are_messages_and_change_nothing(gimp: GimpRoot):
    dead = f"tcp://127.0.0.1:{free_port()}"
    verdict = gimp.batch("errors", {"BD_DEAD_ENDPOINT": dead}, gui=False)
    assert verdict["dead_engine_seconds"] < 15


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # processes come and go
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


# how the engine drops a vanished client's job: its connection closed (ZeroMQ's monitor, within
# a second), or its keep-alives stopped
ORPHANED = re.compile(r"\((disconnected|keepalive)\)")


def test_cancel_in_gimp_kills_the_plug_in_and_the_engine_drops_the_job(gimp, tiny_engine):
    """GIMP's Cancel kills the plug-in and tells no one: the engine must notice the keep-alives
    stopping and free its worker. Killed here the same way, by its process id."""
    endpoint, log = tiny_engine
    queued = log.read_text().count("queued")

    def kill_plugin_mid_job(gimp_process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 60
        while log.read_text().count("queued") == queued:
            assert time.monotonic() < deadline, "the engine never got the job"
            time.sleep(0.1)
        time.sleep(1.0)  # a few steps in
        pids = [
            p
            for p in descendants(gimp_process.pid)
            if b"blended_diffusion.py" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert pids, "the plug-in's process was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KEEPALIVE + 10
        while not ORPHANED.search(log.read_text()):
            assert time.monotonic() < deadline, f"the engine kept the job:\n{log.read_text()}"
            time.sleep(0.1)

    dead = f"tcp://127.0.0.1:{free_port()}"  # the next run, which removes a preview left behind
    env = {"BD_ENDPOINT": endpoint, "BD_DEAD_ENDPOINT": dead}
    verdict = gimp.batch("cancel", env, False, during=kill_plugin_mid_job)
    print(f"\npreview layer left by the kill: {verdict['preview_left_by_the_kill']}")
    line = next(x for x in log.read_text().splitlines() if ORPHANED.search(x))
    assert "cancelled" in line, line
