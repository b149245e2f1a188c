"""The docker's runs: live thumbnails of the variants while the engine works, then the document's
history of runs (thumbnail, prompt, seed per variant) with Keep, Discard, Again and Vary.

The history itself is the shared core's (engine/shared/history.py); this is its Qt face. Nothing
shown here enters the document: previews are pictures in the docker only, and the results are
the layers the job added. Clicking a finished variant shows it alone in the image.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.shared.history import DONE, RUNNING, Run, Shot

from .qt import (
    QHBoxLayout,
    QIcon,
    QImage,
    QLabel,
    QPixmap,
    QPushButton,
    QSize,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

THUMB, BEST = 48, 96  # pixels: a variant, and the best so far (or the best result)
SHOWN_RUNS = 5  # the newest runs listed; older ones stay in the history
THUMB_NAME = "blended_diffusion_thumbnail"  # the real-Krita driver finds thumbnails by it


def picture(shot: Shot) -> QImage:
    """The result's own pixels once there is one, else the latest preview."""
    v = shot.result
    if v is not None:
        fmt = QImage.Format.Format_RGBA8888
        return QImage(v.rgba, v.width, v.height, v.width * 4, fmt).copy()
    image = QImage()
    image.loadFromData(shot.picture, "PNG")
    return image


class RunsPanel(QWidget):
    """`act(name, run, shot)` does show / keep / discard / again / vary for the docker."""

    def __init__(self, parent, act: Callable[[str, Run, Shot | None], None]) -> None:
        super().__init__(parent)
        self.act = act
        self.chosen: tuple[Run, Shot] | None = None
        # each shown variant's icon and the picture it was made from: a rebuild (every preview
        # event) decodes only the pictures that changed
        self._icons: dict[int, tuple[object, QIcon | None]] = {}
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._content = QWidget(self)
        self._layout.addWidget(self._content)
        buttons = QHBoxLayout()
        self.buttons = {}
        for action, tip in (
            ("keep", "Keep only the chosen variant of its run (one undo step)"),
            ("discard", "Remove the chosen run's layers (one undo step)"),
            ("again", "Run the chosen run again with its settings and a new seed"),
            ("vary", "Run again from the chosen variant's seed (change the prompt or strength "
                     "first: the same settings give the same picture)"),
        ):  # fmt: skip
            button = QPushButton(action.capitalize(), self)
            button.setToolTip(tip)
            button.setEnabled(False)
            button.clicked.connect(lambda _=False, a=action: self._act(a))
            buttons.addWidget(button)
            self.buttons[action] = button
        self._layout.addLayout(buttons)

    def show_runs(self, runs: list[Run]) -> None:
        """Rebuild the list (at most one preview a second arrives: cheap enough with the icons
        kept)."""
        if self.chosen and self.chosen[0] not in runs:
            self.chosen = None
        icons, self._icons = self._icons, {}
        content = QWidget(self)
        column = QVBoxLayout(content)
        column.setContentsMargins(0, 0, 0, 0)
        for run in runs[:SHOWN_RUNS]:
            title = QLabel(f"{run.prompt}" + (" (running…)" if run.state == RUNNING else ""))
            title.setWordWrap(True)
            column.addWidget(title)
            row = QHBoxLayout()
            best = run.best
            for shot in run.shots:
                row.addWidget(self._thumbnail(run, shot, shot is best, icons))
            row.addStretch(1)
            column.addLayout(row)
        self._layout.replaceWidget(self._content, content)
        self._content.deleteLater()
        self._content = content
        self._enable()

    def _icon(self, shot: Shot, shown: dict[int, tuple[object, QIcon | None]]) -> QIcon | None:
        """The shot's icon: the one shown last time while its picture is the same object."""
        source = shot.result if shot.result is not None else shot.picture
        made = shown.get(id(shot))  # an id reused by a new shot: its picture is another object
        if made is None or made[0] is not source:
            image = picture(shot)
            made = source, None if image.isNull() else QIcon(QPixmap.fromImage(image))
        self._icons[id(shot)] = made
        return made[1]

    def _thumbnail(
        self, run: Run, shot: Shot, best: bool, shown: dict[int, tuple[object, QIcon | None]]
    ) -> QToolButton:
        side = BEST if best else THUMB
        button = QToolButton(self)
        button.setObjectName(THUMB_NAME)
        icon = self._icon(shot, shown)
        if icon is not None:
            button.setIcon(icon)
        button.setIconSize(QSize(side, side))
        button.setToolTip(("best so far: " if best and run.state == RUNNING else "") + shot.label)
        button.setCheckable(True)
        button.setChecked(self.chosen == (run, shot))
        button.setEnabled(run.state != RUNNING)
        button.clicked.connect(lambda _=False: self._choose(run, shot))
        return button

    def _choose(self, run: Run, shot: Shot) -> None:
        self.chosen = (run, shot)
        self.act("show", run, shot)

    def _act(self, name: str) -> None:
        if self.chosen:
            self.act(name, *self.chosen)

    def _enable(self) -> None:
        run = self.chosen[0] if self.chosen else None
        for button in self.buttons.values():
            button.setEnabled(run is not None and (run.state != RUNNING))
        if run is not None and run.state != DONE:  # a kept run: nothing left to choose
            self.buttons["keep"].setEnabled(False)
            self.buttons["discard"].setEnabled(False)
