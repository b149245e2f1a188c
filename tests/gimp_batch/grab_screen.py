"""Runs inside the trixie root with the root's python3 while GIMP runs on Xvfb: writes the
whole X screen ($DISPLAY, $XAUTHORITY: GIMP's) to the PNG named by argv[1], through GTK's Gdk
(in the root with GIMP: no screenshot tool to install)."""

import sys

import gi

gi.require_version("Gdk", "3.0")
from gi.repository import Gdk  # noqa: E402

root = Gdk.get_default_root_window()
if root is None:
    sys.exit("no X display: DISPLAY and XAUTHORITY must be GIMP's")
shot = Gdk.pixbuf_get_from_window(root, 0, 0, root.get_width(), root.get_height())
shot.savev(sys.argv[1], "png", [], [])
