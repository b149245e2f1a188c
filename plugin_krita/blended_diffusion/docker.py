"""The docker: prompt, negative prompt, preset, seed, Advanced settings, the engine's state,
Generate/Cancel, progress and a message line.

Every setting's widget is made from the shared settings table (engine/shared/settings.py), as
GIMP's procedure is. The engine's hello (asked before any Generate) names its method: the docker
shows the settings that method takes (settings.shown; the others hidden, their values kept) and
the preset's values for it, and sends that method's request (while the engine does not answer,
the last method seen; the pixel method before any hello, and for an older engine's).

A Generate reads the document through `document.capture` and leaves the edit to the shared flow
(engine/shared/flow.py), ticking it from a QTimer while it is active; the flow shows its progress
here through the document's KritaHost. A Generate pressed while an edit runs is queued (its
pixels read at the press). Settings persist in Krita's settings store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from engine.shared import flow, settings, wording
from engine.shared.flow import CANCELLED, DONE, FAILED, EditError, Status
from engine.shared.history import History, Run, Shot
from engine.shared.settings import Setting

from . import document
from .document import DockWidget, KritaHost
from .qt import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTimer,
    QVBoxLayout,
    QWidget,
)
from .runs import RunsPanel

DOCKER_ID = "blended_diffusion_docker"
TITLE = "Blended Diffusion"
COLORS = {FAILED: "#d04040", DONE: "#40a040", CANCELLED: "#b08030"}
MAX_WAITING = 3  # Generates queued behind the running one
INTERVAL_MS = round(settings.POLL_SECONDS * 1000)
HISTORY = History()  # every document's runs since Krita started, shared by all windows


class Kind(NamedTuple):
    """How a kind of setting is shown: its widget, read, written, and the signal of a change."""

    make: Callable[[Setting], Any]
    read: Callable[[Any], Any]
    write: Callable[[Any, Any], None]
    changed: Callable[[Any], Any]


def _prompt_box(_: Setting) -> QPlainTextEdit:
    widget = QPlainTextEdit()
    widget.setPlaceholderText("What the selection should become, e.g. a red ball")
    widget.setMaximumHeight(70)
    return widget


def _choice_box(setting: Setting) -> QComboBox:
    widget = QComboBox()
    for value, label in setting.choices:
        widget.addItem(label, value)
    return widget


def _number_box(setting: Setting):
    widget = QSpinBox() if setting.kind is int else QDoubleSpinBox()
    if setting.kind is float:
        widget.setDecimals(setting.decimals)
        widget.setSingleStep(setting.step)
    widget.setRange(setting.low, setting.high)
    widget.setSpecialValueText(setting.special)  # shown at the minimum
    return widget


KINDS = {
    "prompt": Kind(_prompt_box, lambda w: w.toPlainText(), lambda w, v: w.setPlainText(v),
                   lambda w: w.textChanged),
    "choice": Kind(_choice_box, lambda w: w.currentData(),
                   lambda w, v: w.setCurrentIndex(w.findData(v)), lambda w: w.currentIndexChanged),
    "text": Kind(lambda _: QLineEdit(), lambda w: w.text().strip(), lambda w, v: w.setText(v),
                 lambda w: w.editingFinished),
    "flag": Kind(lambda s: QCheckBox(s.label), lambda w: w.isChecked(),
                 lambda w, v: w.setChecked(v), lambda w: w.toggled),
    "number": Kind(_number_box, lambda w: w.value(), lambda w, v: w.setValue(v),
                   lambda w: w.valueChanged),
}  # fmt: skip


def kind(setting: Setting) -> Kind:
    if setting.name == "prompt":
        return KINDS["prompt"]
    if setting.choices:
        return KINDS["choice"]
    return KINDS[{str: "text", bool: "flag"}.get(setting.kind, "number")]


def make_field(setting: Setting):
    """The widget of one setting, with the table's range, default and tooltip."""
    widget = kind(setting).make(setting)
    widget.setToolTip(setting.tooltip)
    write_field(widget, setting, setting.default)
    return widget


def read_field(widget, setting: Setting) -> Any:
    return kind(setting).read(widget)


def write_field(widget, setting: Setting, value: Any) -> None:
    kind(setting).write(widget, value)


class BlendedDiffusionDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(TITLE)
        self.edit: flow.Edit | None = None  # the running edit, else the last one
        self.info: dict[str, Any] = {}  # the engine's hello: model, device, limits, step times
        self._waiting: list[tuple[KritaHost, settings.Request, str]] = []  # and their presets
        self._last_seed: int | None = None  # the best variant's of the last result
        self._probe: flow.Probe | None = None
        self._method = settings.PIXEL  # the engine's (its last hello's), whose settings show
        self._timer = QTimer(self)
        self._timer.setInterval(INTERVAL_MS)
        self._timer.timeout.connect(self._tick)
        self.follower = settings.PresetFollower(self.values, self.set_values, self.method)
        self._build()
        self._load_settings()
        self._show_method(settings.PIXEL)  # lays the forms' rows out
        self.check_engine()

    # -- UI ----------------------------------------------------------------------------------

    def _build(self) -> None:
        root = QWidget(self)
        layout = QVBoxLayout(root)
        self.fields = {s.name: make_field(s) for s in settings.TABLE}
        self.labels: dict[str, QLabel] = {}  # each form row's label, hidden with its field
        layout.addWidget(self.fields["prompt"])
        self.fields["negative_prompt"].setPlaceholderText("Negative prompt: what to leave out")
        self.connection = QLabel(root)
        self.connection.setWordWrap(True)
        layout.addWidget(self.connection)

        # each form's rows, (setting, label, field or layout), laid out by _show_method
        self._forms: list[tuple[Any, list[tuple[str, Any, Any]]]] = []
        self._laid: list[int] = []  # the rows each form holds now
        form = QFormLayout()
        self.last_seed = QPushButton("last: –", root)
        self.last_seed.setToolTip("Reuse the best result's seed")
        self.last_seed.setFlat(True)
        self.last_seed.clicked.connect(self._reuse_seed)
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.fields["seed"])
        seed_row.addWidget(self.last_seed)
        rows = [self._row("negative_prompt", root), self._row("preset", root)]
        self._forms.append((form, [*rows, self._row("seed", root, seed_row)]))
        layout.addLayout(form)

        self.show_advanced = QCheckBox("Advanced", root)
        self.advanced = QWidget(root)
        advanced = QFormLayout(self.advanced)
        self._forms.append((advanced, [self._row(s.name, self.advanced) for s in settings.TABLE
                                       if s.advanced or s.name == "endpoint"]))  # fmt: skip
        self._laid = [0] * len(self._forms)
        self.show_advanced.toggled.connect(self.advanced.setVisible)
        self.advanced.setVisible(False)
        layout.addWidget(self.show_advanced)
        layout.addWidget(self.advanced)
        self.expected = QLabel(root)
        self.expected.setWordWrap(True)
        layout.addWidget(self.expected)

        buttons = QHBoxLayout()
        self.generate_button = QPushButton("Generate", root)
        self.generate_button.setToolTip(
            "Edit the selection of the visible picture, results above the active layer "
            "(Ctrl+Alt+Shift+G); pressed during an edit, it queues the next one"
        )
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button = QPushButton("Cancel", root)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar(root)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.status = QLabel("Select a region, describe it, press Generate.", root)
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.runs = RunsPanel(root, self._act)
        layout.addWidget(self.runs)
        layout.addStretch(1)
        self.setWidget(root)

        for s in settings.TABLE:
            signal = kind(s).changed(self.fields[s.name])
            if s.name == "preset" or s.advanced:
                signal.connect(lambda *_, name=s.name: self.follower.changed(name))
            if s.name == "endpoint":
                signal.connect(self.check_engine)
            elif s.name != "prompt":
                signal.connect(lambda *_: self._show_expected())

    def _row(self, name: str, parent, field=None) -> tuple[str, Any, Any]:
        """A form's row of a setting: its label (a check box says its own) and its field."""
        setting = settings.BY_NAME[name]
        text = "" if setting.kind is bool else setting.label
        self.labels[name] = label = QLabel(text, parent)
        label.setToolTip(setting.tooltip)
        return name, label, self.fields[name] if field is None else field

    def method(self) -> str:
        """The engine's method, as its last hello named it (the pixel one before any)."""
        return self._method

    def _show_method(self, method: str) -> None:
        """Show the settings `method` takes, hide the others; a new method's preset values.
        The forms hold only the rows shown: Qt 5's QFormLayout keeps a hidden row's spacing."""
        shown = set(settings.shown(method))
        self.fields["prompt"].setVisible("prompt" in shown)
        for i, (form, rows) in enumerate(self._forms):
            for _ in range(self._laid[i]):
                form.takeRow(0)  # the widgets stay, the row goes
            self._laid[i] = 0
            for name, label, field in rows:
                if name in shown:
                    form.addRow(label, field)
                    self._laid[i] += 1
                label.setVisible(name in shown)  # in a form (its parent's) or hidden
                if field is self.fields[name]:
                    field.setVisible(name in shown)
        if method != self._method:
            self._method = method
            self.follower.preset_changed()  # e.g. the latent Draft's steps: its scheduler's

    def canvasChanged(self, canvas) -> None:  # Krita calls it by this name
        pass  # the document is read when Generate is pressed

    def values(self) -> dict[str, Any]:
        return {s.name: read_field(self.fields[s.name], s) for s in settings.TABLE}

    def set_values(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            write_field(self.fields[name], settings.BY_NAME[name], value)

    # -- the engine's state ------------------------------------------------------------------

    def check_engine(self) -> None:
        """Ask the engine what it runs (in the background); the answer shows above the form.
        While a probe is out, a new one waits for it: `_probed` asks again if the endpoint
        changed meanwhile (a dead address takes the client's whole timeout to fail)."""
        if self._probe is not None:
            return
        endpoint = self._endpoint()
        self.connection.setText(f"Engine: connecting to {endpoint}…")
        try:
            self._probe = flow.Probe(endpoint)
        except Exception as e:  # never into Qt: PyQt may abort Krita on an uncaught exception
            self.connection.setText(wording.describe(e))
            return
        self._timer.start()

    def _endpoint(self) -> str:
        return self.values()["endpoint"] or settings.DEFAULT_ENDPOINT

    def _probed(self) -> None:
        probe, self._probe = self._probe, None
        if probe.endpoint != self._endpoint().strip():  # asked of an address no longer set
            return self.check_engine()
        self.info, line = probe.result()
        if self.info:  # an engine that does not answer keeps the last one's settings shown
            self._show_method(self.info.get("method") or settings.PIXEL)
        self.connection.setText(line)
        self.connection.setToolTip(f"{self.info.get('models', '')}\n{self._endpoint()}".strip())
        limited = settings.table(self.info.get("limits"))
        for s in limited:
            if s.high is not None:
                self.fields[s.name].setMaximum(s.high)
        self._show_expected()

    def _show_expected(self) -> None:
        values = self.values()
        try:
            request = settings.request(values | {"prompt": "-"}, self.info.get("limits"),
                                       self.method())  # fmt: skip
        except ValueError as e:
            return self.expected.setText(str(e))
        preset = values["preset"]
        self.expected.setText(wording.before_run(self.info, request.settings, preset))

    # -- actions -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.edit is not None and self.edit.active

    def generate(self) -> None:
        """Edit the selection now, or after the running edit (read now, queued)."""
        values = self.values()
        self._save_settings(values)
        if self.busy and len(self._waiting) >= MAX_WAITING:
            return self._message(
                f"{MAX_WAITING} edits are already waiting: Generate again once one has finished.",
                FAILED,
            )
        limits = self.info.get("limits")
        try:  # the flow makes it again for the hello the edit gets (the engine may have changed)
            request = settings.request(values, limits, self.method())
            host = document.capture(request, limits, self.show_status, self._show_runs)
        except (EditError, ValueError) as e:
            return self._message(str(e), FAILED)
        except Exception as e:  # never into Qt: PyQt may abort Krita on an uncaught exception
            return self._message(wording.describe(e), FAILED)
        self._launch(host, request, values["preset"])

    def _launch(self, host: KritaHost, request: settings.Request, preset: str = "") -> None:
        if self.busy:
            self._waiting.append((host, request, preset))
            return self._message(
                f"Queued: starts when the current edit ends ({len(self._waiting)} waiting).",
            )
        run = HISTORY.start(host.document, request.prompt, request.settings, host)
        self.edit = flow.Edit(host, request, preset=preset, run=run)
        self.edit.start()
        self._timer.start()
        self._show_runs()

    def _act(self, action: str, run: Run, shot: Shot | None) -> None:
        """A history button: show a variant alone, keep it, discard the run, run it again."""
        host = run.source
        try:
            if action == "show":
                document.show_only(host, shot.layer)
            elif action == "keep":
                document.keep(host, shot.layer)
                HISTORY.keep(run, shot)
            elif action == "discard":
                document.discard(host)
                HISTORY.discard(run)
            else:  # again, vary: the same pixels and selection as the run read
                change = run.again() if action == "again" else run.vary(shot)
                request = settings.Request(run.prompt, self._endpoint(), change, host.layer_only)
                self._launch(replace(host, group=None), request)
        except EditError as e:
            self._message(str(e), FAILED)
        except Exception as e:  # never into Qt: PyQt may abort Krita on an uncaught exception
            self._message(wording.describe(e), FAILED)
        self._show_runs()

    def _show_runs(self) -> None:
        try:
            self.runs.show_runs(HISTORY.runs(document.active_document()))
        except Exception as e:  # never into Qt: Krita shows a modal dialog for it
            self._message(wording.describe(e), FAILED)

    def cancel(self) -> None:
        dropped, self._waiting = len(self._waiting), []
        if self.edit is not None:
            self.edit.cancel()
        if dropped:
            self._message(f"Cancelling, and {dropped} waiting edit(s) dropped…")

    def _tick(self) -> None:
        if self._probe is not None and self._probe.done:
            self._probed()
        try:
            if self.edit is not None:
                self.edit.tick()
            if not self.busy and self._waiting:
                self._launch(*self._waiting.pop(0))
        except Exception as e:  # a bug must not take Krita down: say it
            self._message(wording.describe(e), FAILED)
        if not self.busy and self._probe is None:
            self._timer.stop()

    def _reuse_seed(self) -> None:
        if self._last_seed is not None:
            seed = self.fields["seed"]
            seed.setValue(min(self._last_seed, seed.maximum()))

    # -- showing the state -------------------------------------------------------------------

    def show_status(self, status: Status) -> None:
        """The running edit's state (KritaHost.show): buttons, progress bar, message line."""
        active = status.active
        self.cancel_button.setEnabled(active)
        if status.total:
            self.progress_bar.setRange(0, status.total)
            self.progress_bar.setValue(status.step)
        elif active:
            self.progress_bar.setRange(0, 0)  # busy: waiting for the first step
        else:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1 if status.state == DONE else 0)
        waiting = f" ({len(self._waiting)} waiting)" if active and self._waiting else ""
        self._message(status.message + waiting, status.state)
        if active:
            return
        edit = self.edit
        if status.state == DONE:
            self._last_seed = edit.job.variants[0].seed
            self.last_seed.setText(f"last: {self._last_seed}")
            # Krita activates the new group a moment after it is added: the source again later
            QTimer.singleShot(0, lambda: document.reactivate(edit.host))
        self._show_runs()
        self.check_engine()  # the engine measured this run's steps: a better estimate

    def _message(self, text: str, state: str = "") -> None:
        color = COLORS.get(state)
        self.status.setStyleSheet(f"color: {color};" if color else "")
        self.status.setText(text)

    # -- settings ----------------------------------------------------------------------------

    def _load_settings(self) -> None:
        stored = {
            s.name: settings.coerce(s, document.read_setting(s.name, str(s.default)))
            for s in settings.TABLE
        }
        self.set_values(settings.effective(stored))
        self._show_expected()

    def _save_settings(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            document.write_setting(name, value)
