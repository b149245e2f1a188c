"""The menu action and its shortcut: Tools > Scripts > Blended Diffusion: Generate."""

from __future__ import annotations

from . import document
from .docker import DOCKER_ID
from .document import Extension
from .qt import QKeySequence

ACTION_ID = "blended_diffusion_generate"
ACTION_TEXT = "Blended Diffusion: Generate"
# Ctrl+Alt+G is Krita's "Quick Ungroup" (and Alt+Shift+G another action): a clash would make
# both shortcuts ambiguous, so the default is one Krita 5.2 leaves free.
SHORTCUT = "Ctrl+Alt+Shift+G"


class BlendedDiffusionExtension(Extension):
    def setup(self) -> None:
        pass

    def createActions(self, window) -> None:  # Krita calls it by this name
        action = window.createAction(ACTION_ID, ACTION_TEXT, "tools/scripts")
        if action.shortcut().isEmpty():  # the .action file or the user's own keys win
            action.setShortcut(QKeySequence(SHORTCUT))
        action.triggered.connect(self.generate)

    def generate(self) -> None:
        docker = document.active_window_docker(DOCKER_ID)
        if docker is None:
            return
        docker.show()  # the messages and the progress are there
        docker.raise_()
        docker.generate()
