"""The docker: prompt, settings, Generate/Cancel, progress and a message line.

It reads the document through `document` and leaves the job to `job.Controller`, ticking it
from a QTimer while a job is active. Settings persist in Krita's own settings store.
"""

from __future__ import annotations

from . import document
from .document import DockWidget, UserError
from .job import ACTIVE, CANCELLED, DONE, FAILED, INTERVAL_MS, Controller, Progress, describe
from .qt import (
    QCheckBox,
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

DOCKER_ID = "blended_diffusion_docker"
TITLE = "Blended Diffusion"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
MAX_SEED = 2**31 - 1  # QSpinBox holds a C int; the engine takes up to 2**32 - 1
COLORS = {FAILED: "#d04040", DONE: "#40a040", CANCELLED: "#b08030"}


class BlendedDiffusionDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(TITLE)
        self.controller = Controller(self._show)
        self._export: document.Export | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(INTERVAL_MS)
        self._timer.timeout.connect(self._tick)
        self._build()
        self._load_settings()

    # -- UI ----------------------------------------------------------------------------------

    def _build(self) -> None:
        root = QWidget(self)
        layout = QVBoxLayout(root)
        self.prompt = QPlainTextEdit(root)
        self.prompt.setPlaceholderText("What the selection should become, e.g. a red ball")
        self.prompt.setMaximumHeight(70)
        layout.addWidget(self.prompt)

        form = QFormLayout()
        self.variants = _spin(1, 8, 4, "How many results to make; the best is shown")
        self.steps = _spin(1, 1000, 100, "Denoising steps")
        self.skip = _spin(0, 999, 25, "First steps skipped: higher keeps more of the layout")
        self.guidance = QDoubleSpinBox(root)
        self.guidance.setRange(-1, 1e6)
        self.guidance.setDecimals(0)
        self.guidance.setSingleStep(50)
        self.guidance.setSpecialValueText("model default")  # shown at -1: the setting is omitted
        self.guidance.setToolTip("How strongly CLIP pulls the edit towards the prompt")
        self.fast = QCheckBox("Fast guidance", root)
        self.fast.setToolTip(
            "CLIP's gradient without a backward pass through the UNet: about 3x faster a step, "
            "rougher results (the engine uses the model's own default weight for it)"
        )
        self.random_seed = QCheckBox("random", root)
        self.seed = _spin(0, MAX_SEED, 0, "The seed used when 'random' is off")
        self.last_seed = QPushButton("last: –", root)
        self.last_seed.setToolTip("Reuse the best result's seed")
        self.last_seed.setFlat(True)
        self.last_seed.clicked.connect(self._reuse_seed)
        self.random_seed.toggled.connect(lambda on: self.seed.setEnabled(not on))
        seed_row = QHBoxLayout()
        for widget in (self.random_seed, self.seed, self.last_seed):
            seed_row.addWidget(widget)
        self.endpoint = QLineEdit(root)
        self.endpoint.setToolTip("Where `python -m engine serve` listens")
        form.addRow("Variants", self.variants)
        form.addRow("Seed", seed_row)
        form.addRow("Steps", self.steps)
        form.addRow("Skip", self.skip)
        form.addRow("Guidance", self.guidance)
        form.addRow("", self.fast)
        form.addRow("Engine", self.endpoint)
        layout.addLayout(form)

        buttons = QHBoxLayout()
        self.generate_button = QPushButton("Generate", root)
        self.generate_button.setToolTip("Edit the selection of the active layer (Ctrl+Alt+Shift+G)")
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button = QPushButton("Cancel", root)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.controller.cancel)
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
        layout.addStretch(1)
        self.setWidget(root)

    def canvasChanged(self, canvas) -> None:  # Krita calls it by this name
        pass  # the document is read when Generate is pressed

    # -- actions -----------------------------------------------------------------------------

    def generate(self) -> None:
        if self.controller.active:
            return
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            return self._message("Describe what the selection should become first.", FAILED)
        self._save_settings()
        try:
            self._export = document.export_active()
        except UserError as e:
            return self._message(str(e), FAILED)
        except Exception as e:  # never into Qt: PyQt may abort Krita on an uncaught exception
            return self._message(describe(e), FAILED)
        request = self._export.request(prompt, self.settings())
        self.controller.start(self.endpoint.text(), request, self._apply)
        if self.controller.active:
            self._timer.start()

    def settings(self) -> dict:
        """The engine settings from the widgets (docs/protocol.md, Settings)."""
        steps = self.steps.value()
        out = {"variants": self.variants.value(), "steps": steps}
        out["skip"] = min(self.skip.value(), steps - 1)
        out["seed"] = None if self.random_seed.isChecked() else self.seed.value()
        if self.guidance.value() >= 0:
            out["guidance_weight"] = float(self.guidance.value())
        out["guidance_mode"] = "fast" if self.fast.isChecked() else "full"
        return out

    def _apply(self, group_name: str, layers) -> str:
        export, self._export = self._export, None
        summary = document.add_results(export, group_name, layers)
        QTimer.singleShot(0, lambda: document.reactivate(export))
        return summary

    def _tick(self) -> None:
        try:
            active = self.controller.tick()
        except Exception as e:  # a bug must not take Krita down: say it and stop polling
            active = False
            self._message(describe(e), FAILED)
        if not active:
            self._timer.stop()

    def _reuse_seed(self) -> None:
        if self.controller.progress.seed is not None:
            self.random_seed.setChecked(False)
            self.seed.setValue(min(self.controller.progress.seed, MAX_SEED))

    # -- showing the state -------------------------------------------------------------------

    def _show(self, progress: Progress) -> None:
        active = progress.state in ACTIVE
        self.generate_button.setEnabled(not active)
        self.cancel_button.setEnabled(active)
        if progress.total:
            self.progress_bar.setRange(0, progress.total)
            self.progress_bar.setValue(progress.step)
        elif active:
            self.progress_bar.setRange(0, 0)  # busy: waiting for the first step
        else:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1 if progress.state == DONE else 0)
        if progress.seed is not None:
            self.last_seed.setText(f"last: {progress.seed}")
        self._message(progress.message, progress.state)

    def _message(self, text: str, state: str = "") -> None:
        color = COLORS.get(state)
        self.status.setStyleSheet(f"color: {color};" if color else "")
        self.status.setText(text)

    # -- settings ----------------------------------------------------------------------------

    def _load_settings(self) -> None:
        read = document.read_setting
        self.prompt.setPlainText(read("prompt", ""))
        self.variants.setValue(_int(read("variants", "4"), 4))
        self.steps.setValue(_int(read("steps", "100"), 100))
        self.skip.setValue(_int(read("skip", "25"), 25))
        self.guidance.setValue(_int(read("guidance_weight", "-1"), -1))
        self.fast.setChecked(read("guidance_mode", "full") == "fast")
        self.random_seed.setChecked(read("random_seed", "true") == "true")
        self.seed.setEnabled(not self.random_seed.isChecked())
        self.seed.setValue(_int(read("seed", "0"), 0))
        self.endpoint.setText(read("endpoint", DEFAULT_ENDPOINT) or DEFAULT_ENDPOINT)

    def _save_settings(self) -> None:
        write = document.write_setting
        write("prompt", self.prompt.toPlainText())
        for key, box in (("variants", self.variants), ("steps", self.steps), ("skip", self.skip)):
            write(key, box.value())
        write("guidance_weight", int(self.guidance.value()))
        write("guidance_mode", "fast" if self.fast.isChecked() else "full")
        write("random_seed", "true" if self.random_seed.isChecked() else "false")
        write("seed", self.seed.value())
        write("endpoint", self.endpoint.text().strip())


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _int(text: str, default: int) -> int:
    try:
        return int(float(text))
    except ValueError:
        return default
