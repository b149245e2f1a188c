"""The progress window of a run with a UI (interactive, or with the last values).

GIMP's own Cancel, on the image window's status bar, kills the plug-in: the preview layer stays
in the image and the engine learns of it only from the missing keep-alives. So these runs never
start GIMP's progress (no Gimp.progress_* call, hence no status-bar Cancel) and show it here,
with a Cancel the plug-in sees. libgimpui's ProgressBar would take over GIMP's progress instead,
but GIMP 3.0.4 refuses the progress callback it installs (the bar stays empty and the status bar
keeps the progress and its Cancel), so the bar here is GTK's own. No main loop: GIMP is not
thread-safe, so the procedure asks `cancelled()` between the edit's ticks (engine/shared/flow.py),
which handles the window's pending events; the edit's waits on the engine never block them.
"""

from __future__ import annotations

import gi

gi.require_version("Gdk", "3.0")
gi.require_version("Gtk", "3.0")
gi.require_version("GimpUi", "3.0")
from gi.repository import Gdk, GimpUi, GLib, Gtk  # noqa: E402

from engine.shared.wording import GROUP_PREFIX  # noqa: E402

WIDTH = 46  # characters the status text wraps at: a run's longest line takes two rows


def can_show() -> bool:
    """Whether windows can open (gimp-console has no screen; GimpUi.init would abort there)."""
    return Gtk.init_check()[0]


class ProgressWindow:
    """A small window: the run's name (`title`, its group's), the status text, a progress bar,
    Cancel (Escape and closing the window cancel too); transient for the image window the
    plug-in was started from."""

    def __init__(self, plug_in: str, title: str) -> None:
        GimpUi.init(plug_in)
        self._cancelled = False
        self.window = window = Gtk.Window(title=title, resizable=False, border_width=12)
        window.set_position(Gtk.WindowPosition.CENTER)
        GimpUi.window_set_transient(window)
        heading = Gtk.Label(xalign=0.0, wrap=True, max_width_chars=WIDTH)
        heading.set_markup(f"<b>{GLib.markup_escape_text(title)}</b>")  # also without a title bar
        self.status = Gtk.Label(xalign=0.0, wrap=True, width_chars=WIDTH, max_width_chars=WIDTH)
        self.bar = Gtk.ProgressBar()
        self.button = Gtk.Button.new_with_mnemonic("_Cancel")
        self.button.connect("clicked", lambda _: self._cancel())
        window.connect("delete-event", self._closing)
        window.connect("key-press-event", self._key)
        buttons = Gtk.ButtonBox(layout_style=Gtk.ButtonBoxStyle.END)
        buttons.add(self.button)
        box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=10)
        for widget in (heading, self.status, self.bar, buttons):
            box.add(widget)
        window.add(box)
        window.show_all()
        self._pump()

    def show(self, fraction: float, text: str) -> None:
        self.status.set_text(text.removeprefix(GROUP_PREFIX))  # the title names the plug-in
        self.bar.set_fraction(fraction)
        self._pump()

    def cancelled(self) -> bool:
        self._pump()
        return self._cancelled

    def close(self) -> None:
        self.window.destroy()
        self._pump()

    def _cancel(self) -> None:
        self._cancelled = True
        self.button.set_sensitive(False)

    def _closing(self, *_: object) -> bool:
        self._cancel()
        return True  # the window stays until the run has ended

    def _key(self, _window: Gtk.Window, event: Gdk.EventKey) -> bool:
        if event.keyval != Gdk.KEY_Escape:
            return False
        self._cancel()
        return True

    @staticmethod
    def _pump() -> None:
        while Gtk.events_pending():
            Gtk.main_iteration_do(False)
