"""The GIMP 3 plug-in inside real GIMP 3.0.4 (Debian trixie root: tests/hosts/trixie.py).

install.py puts the plug-in into a fresh profile, with a cp313 pyzmq wheel in its `_lib` (the
root's Python 3.13 has none, like users' GIMPs); a real engine runs here, reached over loopback
(the root shares the network namespace); tests/gimp_batch/check_edit.py runs inside GIMP and
writes a JSON verdict. The edit runs in the GUI under Xvfb with a D-Bus session, so GIMP's own
edit-undo action can be triggered; the failure paths run in gimp-console's batch mode. The
mid-run preview is checked from outside, on the screen: the test grabs Xvfb's screen while the
procedure runs in GIMP's window (tests/gimp_batch/grab_screen.py, the root's own Gdk), the job
held by the engine after its first preview until the grab shows it (tests/recording_engine.py:
the tests wait for such events, never for a time); the
plug-in's progress window is found and its Cancel clicked from outside too, with xdotool, as is
the plug-in's dialog (after a failed run it must hold that run's values), whose OK is pressed.

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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.shared import settings
from tests.helpers.engine import free_port
from tests.hosts import trixie, visible
from tests.recording_engine import holding, holds, received, stop_holding

REPO = Path(__file__).resolve().parents[1]
GIMP_PYTHON, PLATFORM = "3.13", "manylinux_2_28_x86_64"  # trixie's Python, its glibc's wheels
WHEELS = trixie.CACHE / "wheels"
HOME = "/home/artist"  # inside the root
BATCH = "/src/tests/gimp_batch/check_edit.py"
GRAB = "/src/tests/gimp_batch/grab_screen.py"  # the X screen to a PNG, with the root's Gdk
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


def trained_demo() -> bool:
    """The demo model's weights are there and its trainer marked them finished (a checkpoint
    of a run cut short does not obey the prompt)."""
    info = DEMO / "demo_unet.json"
    return (
        all((DEMO / f"demo_{n}.pt").is_file() for n in ("unet", "clip"))
        and info.is_file()
        and bool(json.loads(info.read_text()).get("finished"))
    )


MODELS = [
    "tiny",
    pytest.param(
        "demo",
        marks=[
            pytest.mark.skipif(
                not trained_demo(), reason="the demo model is not trained yet (engine/demo/weights)"
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
        endpoint, log = tiny_engine
        if model != "tiny":
            log = tmp_path / "engine.log"
            endpoint = stack.enter_context(engine(model, log))
        start = log.stat().st_size if log.exists() else 0  # the tiny engine's log is shared
        verdict = gimp.batch("edit", {**env, "BD_ENDPOINT": endpoint}, True, f"edit {model}")
    assert png.is_file() and png.stat().st_size > 0
    # Refine large selections is on by default, so the engine planned the pass for every edit
    # (the selection's context, about 50 px, is over 1.5 times the model's 32 px canvas) but the
    # last, which turned it off
    new = log.read_bytes()[start:].decode()
    queued = [line for line in new.splitlines() if ": queued at " in line]
    refined = ["refined over" in line for line in queued]
    assert len(queued) >= 3 and refined == [True] * (len(queued) - 1) + [False], queued
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
    """GIMP's Cancel on its status bar (a script's run shows its progress there) kills the
    plug-in and tells no one, as GIMP quitting mid-run does: the engine must notice the
    keep-alives stopping and free its worker. Killed here the same way, by its process id, once
    the engine holds the job mid-run (after its first preview)."""
    endpoint, log = tiny_engine
    folder = log.parent / "received"

    def kill_plugin_mid_job(gimp_process: subprocess.Popen) -> None:
        wait_for(lambda: holds(folder) == 1, gimp_process, "the engine never held the job")
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
    with holding(folder, "a red circle"):
        verdict = gimp.batch("cancel", env, False, during=kill_plugin_mid_job)
    print(f"\npreview layer left by the kill: {verdict['preview_left_by_the_kill']}")
    line = next(x for x in log.read_text().splitlines() if ORPHANED.search(x))
    assert "cancelled" in line, line


def wait_for(condition, gimp_process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Until `condition()`, while GIMP runs; `what` if it never comes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert gimp_process.poll() is None, f"GIMP ended first: {what}"
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# about half a minute of the tiny model, long enough to cancel (from full strength its random
# UNet diverges by step 15, a non_finite error)
WINDOW_RUN = ("a red ball", {"preset": "custom", "variants": 1, "steps": 1000, "strength": 60,
                             "guidance_weight": 0.0, "seed": 7})  # fmt: skip
QUEUED = re.compile(r"job (\w+): queued")


def test_cancel_in_the_plug_ins_window_leaves_nothing(gimp, tiny_engine):
    """Runs with the last values, in the GUI, show their progress in the plug-in's own window
    (and none on GIMP's status bar, whose Cancel would kill the plug-in). Once the engine works
    and has sent a preview (it holds the job there), the test presses that window's Cancel from
    outside with xdotool: a click on the button in the first run, Escape in the second. Each
    time the engine cancels the job for the client and the procedure returns CANCEL; afterwards
    the batch script finds no layer, no undo step and no dirt left. The screen is grabbed just
    before the click."""
    endpoint, log = tiny_engine
    prompt, fields = WINDOW_RUN
    folder = log.parent / "received"
    queued = len(QUEUED.findall(log.read_text()))
    pressed: list[float] = []
    shot = Path(os.environ.get("GIMP_TEST_OUT", "/tmp")) / "gimp-progress-window.png"

    def press_cancel(gimp_process: subprocess.Popen) -> None:
        for n, run in enumerate(("click", "escape"), 1):
            # the engine holds the run's job once it has sent its first preview
            wait_for(lambda n=n: holds(folder) == n, gimp_process,
                     f"the engine never held the {run} run's job")  # fmt: skip
            display = x_display(gimp_process)
            # the window's title: the run's group name
            window = find_window(gimp.top, display, f'^Blended Diffusion: "{prompt}"$')
            if run == "escape":  # no window manager: the test gives the window the focus
                xdotool(gimp.top, display, "windowfocus", "--sync", window)
                pressed.append(time.time())
                xdotool(gimp.top, display, "key", "Escape")
                continue
            screen = grab_screen(gimp.top, display, gimp.home)
            x, y, w, h = window_box(gimp.top, display, window)
            # Cancel sits in the bottom right corner, inside the window's 12 px border
            pressed.append(time.time())
            xdotool(gimp.top, display, "mousemove", str(x + w - 12 - 24), str(y + h - 12 - 12),
                    "click", "1")  # fmt: skip
            shot.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop_to_window(screen)).save(shot, optimize=True)

    env = {"BD_ENDPOINT": endpoint, "BD_PROMPT": prompt, "BD_FIELDS": json.dumps(fields)}
    with holding(folder, prompt):
        verdict = gimp.batch("window", env, True, during=press_cancel)
    text = log.read_text()
    lines, jobs = text.splitlines(), QUEUED.findall(text)[queued:]
    for run, job, at, returned in zip(("click", "escape"), jobs, pressed, verdict["returned_at"],
                                      strict=True):  # fmt: skip
        (line,) = [x for x in lines if f"job {job}: " in x and " at step " in x]
        assert re.search(r": cancelled at step \d+/\d+ \(client\)$", line), line
        print(f"\nCancel ({run}) -> procedure returned in {returned - at:.2f} s; engine: {line}")
        assert returned - at < 10, returned - at
    print(f"progress window mid-run: {shot}")


def test_the_plug_ins_window_answers_while_it_connects(gimp):
    """A run with the last values against an engine that never answers (a socket that takes
    the connection and says nothing): the client waits up to its 5 s timeout, the window
    answering meanwhile, so the Escape the test presses once the plug-in has connected cancels
    the run at once."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent.settimeout(60)
    pressed: list[float] = []
    connections: list[socket.socket] = []  # open until the test ends: never an answer

    def press_escape(gimp_process: subprocess.Popen) -> None:
        display = x_display(gimp_process)
        window = find_window(gimp.top, display, r'^Blended Diffusion: "a lost lantern"$')
        connections.append(silent.accept()[0])  # the plug-in connected: its hello waits
        xdotool(gimp.top, display, "windowfocus", "--sync", window)  # no window manager
        pressed.append(time.time())
        xdotool(gimp.top, display, "key", "Escape")

    endpoint = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    env = {"BD_ENDPOINT": endpoint, "BD_PROMPT": "a lost lantern", "BD_FIELDS": json.dumps({})}
    with silent:
        verdict = gimp.batch("connecting", env, True, during=press_escape)
    for connection in connections:
        connection.close()
    (at,) = pressed
    returned = verdict["returned_at"] - at
    print(f"\nEscape while connecting -> returned in {returned:.2f} s "
          f"({verdict['returned_at'] - verdict['started_at']:.2f} s after the run started)")
    assert returned < 2.0  # the client's timeout is 5 s: the window was answering


def xdotool(top: Path, display: dict[str, str], *args: str) -> str:
    r = trixie.run(top, ["xdotool", *args], {"HOME": HOME, **display}, 60)
    assert r.returncode == 0, f"xdotool {' '.join(args)}: {r.stderr[-2000:]}"
    return r.stdout


def find_window(top: Path, display: dict[str, str], title: str) -> str:
    """The id of the first visible window whose title matches `title`, once there is one."""
    found = xdotool(top, display, "search", "--sync", "--onlyvisible", "--name", title)
    return found.split()[0]


def window_box(top: Path, display: dict[str, str], window: str) -> tuple[int, int, int, int]:
    """x, y, width, height of an X window on the screen."""
    shell = xdotool(top, display, "getwindowgeometry", "--shell", window)
    geometry = dict(line.split("=", 1) for line in shell.split())
    x, y, w, h = (int(geometry[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
    return x, y, w, h


# Typed values that differ from every default (and from the Draft preset's), for a short run
DIALOG_RUN = ("a teal lantern", {"preset": "custom", "variants": 3, "steps": 6, "strength": 50,
                                 "seed": 4242, "fast_guidance": True, "guidance_weight": 321.5,
                                 "grow": 2, "feather": 3})  # fmt: skip


def test_the_dialog_opens_with_the_values_of_a_failed_run(gimp, tiny_engine):
    """A run with typed values fails (nothing selected); then the batch script runs the
    procedure interactively, giving it no values: its dialog (GimpUi.ProcedureDialog) opens.
    From outside, the test finds it, grabs the screen and clicks OK, touching no field. What
    the engine then receives must be exactly the typed values' request: the dialog held them."""
    endpoint, log = tiny_engine
    prompt, fields = DIALOG_RUN
    queued = len(QUEUED.findall(log.read_text()))
    shot = Path(os.environ.get("GIMP_TEST_OUT", "/tmp")) / "gimp-dialog-after-failure.png"

    def press_ok(gimp_process: subprocess.Popen) -> None:
        display = x_display(gimp_process)
        window = find_window(gimp.top, display, "^Blended Diffusion$")
        grabs: list[np.ndarray] = []

        def drawn() -> bool:  # the same picture twice, and one with text and widgets in it
            x, y, w, h = window_box(gimp.top, display, window)
            grabs.append(grab_screen(gimp.top, display, gimp.home)[y : y + h, x : x + w])
            same = len(grabs) > 1 and np.array_equal(grabs[-2], grabs[-1])
            return same and len(np.unique(grabs[-1].reshape(-1, 3), axis=0)) > 16

        wait_for(drawn, gimp_process, "the dialog was never drawn", timeout=60)
        x, y, w, h = window_box(gimp.top, display, window)
        shot.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grabs[-1]).save(shot, optimize=True)
        # a click, not Return: with no window manager the image window, opened just before,
        # may take the keyboard focus; raised, the dialog is under the pointer. OK's middle is
        # 70 px from the right and 42 px from the bottom (the root's theme and fonts)
        xdotool(gimp.top, display, "windowraise", window)
        xdotool(gimp.top, display, "mousemove", str(x + w - 70), str(y + h - 42), "click", "1")
        deadline = time.monotonic() + 30
        while len(QUEUED.findall(log.read_text())) == queued:
            assert gimp_process.poll() is None, "GIMP ended before the dialog's run"
            if time.monotonic() > deadline:  # what the screen showed instead, to look at
                failed = shot.with_name("gimp-dialog-not-run.png")
                Image.fromarray(grab_screen(gimp.top, display, gimp.home)).save(failed)
                raise AssertionError(f"OK clicked: the engine never got the job; see {failed}")
            time.sleep(0.1)

    env = {"BD_ENDPOINT": endpoint, "BD_PROMPT": prompt, "BD_FIELDS": json.dumps(fields)}
    verdict = gimp.batch("dialog", env, True, during=press_ok)
    jobs = received(log.parent / "received", prompt)
    assert len(jobs) == 1, f"the engine received {len(jobs)} jobs for {prompt!r}"
    sent = jobs[0][2]
    typed = settings.request({**fields, "prompt": prompt, "endpoint": endpoint}).settings
    got = {k: sent[k] for k in typed}
    print(f"\nthe dialog's run ({verdict['dialog_run_seconds']} s): typed {typed}, received {got}"
          f"; dialog: {shot}")  # fmt: skip
    assert got == typed


# the latent method on its random tiny model (seconds): a negative prompt, CFG and a scheduler
# typed, and pixel-only values the run must not send (the engine would refuse them)
LATENT_RUN = ("a red ball", {"preset": "custom", "variants": 2, "steps": 4, "strength": 80,
                             "seed": 7, "negative_prompt": "blurry, text", "guidance": 5.0,
                             "scheduler": "ddim", "fast_guidance": True,
                             "guidance_weight": 250.0})  # fmt: skip


def test_a_latent_edit_in_gimp(gimp, tmp_path: Path):
    """An engine serving the latent method (`--model tiny-latent`): GIMP's run sends what that
    method takes (its hello names it), the negative prompt among them; the results come back as
    a group of two layers, nothing outside the selection changed (tests/gimp_batch/
    check_edit.py's `latent` case); the engine received the negative prompt."""
    prompt, fields = LATENT_RUN
    log = tmp_path / "engine.log"
    with engine("tiny-latent", log) as endpoint:
        env = {"BD_ENDPOINT": endpoint, "BD_PROMPT": prompt, "BD_FIELDS": json.dumps(fields)}
        verdict = gimp.batch("latent", env, gui=False)
    jobs = received(log.parent / "received", prompt)
    assert len(jobs) == 1, f"the engine received {len(jobs)} jobs for {prompt!r}"
    sent = jobs[0][2]
    print(f"\nGIMP latent edit ({verdict['edit_seconds']} s, {verdict['changed_inside']} pixels "
          f"changed inside): the engine ran {sent}")  # fmt: skip
    assert sent["negative_prompt"] == "blurry, text"
    assert (sent["variants"], sent["steps"], sent["strength"]) == (2, 4, 80)
    assert (sent["guidance"], sent["scheduler"]) == (5.0, "ddim")
    assert sent["guidance_mode"] == "full" and sent["guidance_weight"] is None  # not sent


# A run short enough for CI that still shows several previews (one a second at most): the demo
# model's Draft run turns the selection red (the edit test checks it), the tiny model's is noise.
PREVIEW_RUNS = {
    "demo": ("a red circle", {"preset": "draft", "seed": 7}),
    "tiny": ("a red ball", {"preset": "custom", "variants": 1, "steps": 40, "strength": 80,
                            "seed": 7}),
}  # fmt: skip
CANVAS = (80, 96)  # check_edit.py's picture, rows x columns
CORE = (slice(35, 47), slice(56, 72))  # inside its feathered ellipse (44, 26, 40, 30)


def test_gimp_shows_the_preview_mid_run(gimp, tiny_engine, tmp_path: Path):
    """The edit runs in GIMP's window on Xvfb. The test grabs the screen before the run, then,
    once the engine has sent the first preview (it holds the job there: tests/recording_engine.py),
    until a settled grab shows it, and lets the job go on. Mid-run the selection's area on screen
    must show the preview (differ from the picture before the run) and nothing outside the
    selection may change; afterwards the preview layer is gone (the batch script checks the
    layers). The grab that shows the preview is kept, cropped to GIMP's window."""
    model = "demo" if trained_demo() else "tiny"
    prompt, fields = PREVIEW_RUNS[model]
    ready, go = gimp.home / "ready", gimp.home / "go"
    ready.unlink(missing_ok=True)
    go.unlink(missing_ok=True)
    shots: list[np.ndarray] = []  # the grabs while the engine held the job
    grabbed: dict[str, np.ndarray] = {}

    with contextlib.ExitStack() as stack:
        endpoint, log = tiny_engine
        if model != "tiny":
            log = tmp_path / "engine.log"
            endpoint = stack.enter_context(engine(model, log))
        folder = log.parent / "received"

        def watch(gimp_process: subprocess.Popen) -> None:
            wait_for(ready.exists, gimp_process, "the batch script never got ready")
            display = x_display(gimp_process)

            def drawn() -> bool:  # the zoomed display shows the picture, settled
                last = grabbed.get("before")
                grabbed["before"] = grab_screen(gimp.top, display, gimp.home)
                settled = last is not None and np.array_equal(last, grabbed["before"])
                return settled and canvas_at(grabbed["before"]) is not None

            wait_for(drawn, gimp_process, "the picture never showed in GIMP's window")
            corner = canvas_at(grabbed["before"])
            before = pixels_on_screen(grabbed["before"], corner, CANVAS)
            go.touch()
            wait_for(lambda: holds(folder) == 1, gimp_process, "the engine never held the job")

            def previewed() -> bool:  # the preview drawn over the selection, and settled:
                shots.append(grab_screen(gimp.top, display, gimp.home))  # GIMP renders in parts
                change = np.abs(pixels_on_screen(shots[-1], corner, CANVAS) - before).max(axis=2)
                settled = len(shots) > 1 and np.array_equal(shots[-2], shots[-1])
                return settled and float(change[CORE].mean()) >= PREVIEW_CHANGE

            try:
                wait_for(previewed, gimp_process, "no grab showed the preview", timeout=60)
            finally:
                stop_holding(folder)

        env = {"BD_ENDPOINT": endpoint, "BD_PROMPT": prompt, "BD_FIELDS": json.dumps(fields),
               "BD_READY": f"{HOME}/ready", "BD_GO": f"{HOME}/go"}  # fmt: skip
        with holding(folder, prompt):
            verdict = gimp.batch("preview", env, True, f"preview {model}", during=watch)

    selection = np.frombuffer(bytes.fromhex(verdict["selection"]), np.uint8)
    selection = selection.reshape(verdict["size"][1], verdict["size"][0])
    canvas = canvas_at(grabbed["before"])
    before = pixels_on_screen(grabbed["before"], canvas, selection.shape)
    inside, outside = selection == 255, selection == 0
    seen = []
    for screen in shots:
        change = np.abs(pixels_on_screen(screen, canvas, selection.shape) - before).max(axis=2)
        seen.append((round(float(change[inside].mean()), 1),
                     round(float(change[outside].max()), 1)))  # fmt: skip
    print(
        f"\nGIMP mid-run ({model}, edit {verdict['edit_seconds']} s): (mean change inside the "
        f"selection, largest change outside) of each grab while the engine held the job {seen}"
    )
    out = Path(os.environ.get("GIMP_TEST_OUT", "/tmp")) / f"gimp-preview-midrun-{model}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(crop_to_window(shots[-1])).save(out, optimize=True)
    Image.fromarray(crop_to_window(grabbed["before"])).save(out.with_stem(f"{out.stem}-before"))
    print(f"mid-run screenshot: {out}")
    inside_change, outside_change = seen[-1]  # the settled screen
    assert outside_change <= OUTSIDE_TOLERANCE, f"outside changed: {seen}, see {out}"
    assert inside_change >= PREVIEW_CHANGE, f"the selection does not show the preview: {seen}"


ZOOM = 4  # check_edit.py's preview case zooms its display to 400%
PREVIEW_CHANGE = 12.0  # mean change (0-255) over the selection's core that counts as a preview
OUTSIDE_TOLERANCE = 3.0  # rendering noise allowed outside the selection


def x_display(gimp_process: subprocess.Popen) -> dict[str, str]:
    """DISPLAY and XAUTHORITY of the Xvfb that xvfb-run started for GIMP."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in descendants(gimp_process.pid):
            with contextlib.suppress(OSError):
                if b"gimp-3.0" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                    env = dict(
                        item.split("=", 1)
                        for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                        if "=" in item
                    )
                    return {k: env[k] for k in ("DISPLAY", "XAUTHORITY")}
        time.sleep(0.2)
    raise AssertionError("GIMP's process was not found")


def grab_screen(top: Path, display: dict[str, str], home: Path) -> np.ndarray:
    """The X screen as an RGB array (tests/gimp_batch/grab_screen.py inside the root)."""
    shot = home / "screen.png"
    r = trixie.run(top, ["python3", GRAB, f"{HOME}/screen.png"], {"HOME": HOME, **display}, 30)
    assert r.returncode == 0, f"grabbing the screen failed: {r.stderr[-2000:]}"
    return np.asarray(Image.open(shot).convert("RGB")).copy()


def canvas_at(screen: np.ndarray) -> tuple[int, int] | None:
    """Where image pixel (0, 0) starts on screen: found by a few source-layer pixels of
    check_edit.py's picture (colour (4i, 4j, 160) at (10 + i, 8 + j), none of them selected),
    each a ZOOM x ZOOM block on screen; None while the picture is not shown so."""
    corners = []
    for i, j in ((4, 6), (20, 6), (4, 40), (20, 40), (12, 24)):
        hit = np.all(np.abs(screen.astype(int) - (4 * i, 4 * j, 160)) <= 1, axis=2)
        ys, xs = np.nonzero(hit)
        if len(xs) < ZOOM * ZOOM // 2:
            return None
        centre = ZOOM * np.array([10 + i, 8 + j]) + (ZOOM - 1) / 2
        corners.append(np.array([xs.mean(), ys.mean()]) - centre)
    corners = np.array(corners)
    if np.ptp(corners, axis=0).max() >= 1.0:  # not yet at the ZOOM x zoom
        return None
    x, y = np.round(corners.mean(axis=0)).astype(int)
    return int(x), int(y)


def pixels_on_screen(screen: np.ndarray, corner: tuple[int, int], shape) -> np.ndarray:
    """The canvas as GIMP shows it: each image pixel's mean colour over its block's inside
    (one screen pixel of its edge left out: selection outlines, resampling)."""
    x, y = corner
    h, w = shape
    blocks = screen[y : y + ZOOM * h, x : x + ZOOM * w].astype(float)
    assert blocks.shape[:2] == (ZOOM * h, ZOOM * w), "the canvas is not wholly on screen"
    blocks = blocks.reshape(h, ZOOM, w, ZOOM, 3)[:, 1:-1, :, 1:-1]
    return blocks.mean(axis=(1, 3))


def crop_to_window(screen: np.ndarray) -> np.ndarray:
    """The screen without Xvfb's empty (black) rest."""
    ys, xs = np.nonzero(screen.max(axis=2) > 0)
    return screen[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
