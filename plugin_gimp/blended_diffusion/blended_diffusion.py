#!/usr/bin/env python3
"""Blended Diffusion for GIMP 3: Filters > Generic > Blended Diffusion...

Sends the selected part of the visible picture (or of the active layer alone) and a text prompt
to a running engine (`python -m engine serve`) and adds its results as layers above the active
layer, the best visible, in one undo step. The edit itself is the flow both plug-ins share
(_lib/engine/shared/flow.py, with the settings, geometry and wording); this procedure drives it.
Beside this file: params (the arguments, from the shared settings table), adapter (GIMP's side
of the flow: the only Gimp/Gegl pixel and layer code) and progress (the progress window, with
its Cancel, of a run with a UI).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# _lib first: install.py puts the shared client (engine/) and, when GIMP's Python lacks it,
# pyzmq there; this folder next, for the modules beside this file
sys.path[:0] = [os.path.join(HERE, "_lib"), HERE]

import gi  # noqa: E402

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
import params  # noqa: E402
from gi.repository import Gegl, Gimp, GLib, GObject  # noqa: E402

from engine.shared import settings, wording  # noqa: E402

PROCEDURE = "python-fu-blended-diffusion"
KEEP = "python-fu-blended-diffusion-keep"
RW = GObject.ParamFlags.READWRITE
PROBE_WAIT = 1.0  # seconds the dialog waits for the engine's hello: which settings to show


def fail(procedure: Gimp.Procedure, message: str, status=Gimp.PDBStatusType.EXECUTION_ERROR):
    # a returned GLib.Error is the only way the message reaches the user: an uncaught
    # exception shows as "gimp_wire_read(): unexpected EOF"
    return procedure.new_return_values(status, GLib.Error(message))


def served_method(endpoint: str) -> str | None:
    """The method of the engine at `endpoint` (its hello's; an older engine's: pixel) when it
    answers within PROBE_WAIT (a local engine does in milliseconds), else None."""
    from engine.shared import flow

    try:
        probe = flow.Probe(endpoint or settings.DEFAULT_ENDPOINT)
    except Exception:  # no thread, say: the dialog shows every setting
        return None
    deadline = time.monotonic() + PROBE_WAIT
    while not probe.done and time.monotonic() < deadline:
        time.sleep(settings.POLL_SECONDS)
    if not probe.done:  # its thread ends by itself, within the client's timeout
        return None
    info, _ = probe.result()
    return (info.get("method") or settings.PIXEL) if info else None


def ask(procedure: Gimp.Procedure, config: Gimp.ProcedureConfig) -> bool:
    """The procedure's dialog: the preset fills the Advanced settings, editing them shows the
    preset they match. It shows the settings the engine's method takes when the engine answers
    first, else every setting (those of one method labelled with its models)."""
    gi.require_version("GimpUi", "3.0")
    from gi.repository import GimpUi

    GimpUi.init(PROCEDURE)
    method = served_method(config.get_property("endpoint"))
    follower = settings.PresetFollower(
        lambda: params.values(config), lambda v: params.set_values(config, v),
        lambda: method or settings.PIXEL,
    )  # fmt: skip
    if method is not None:
        follower.preset_changed()  # the preset's values for the engine's method
    for s in settings.TABLE:
        if s.advanced or s.name == "preset":
            config.connect(f"notify::{params.prop(s)}", lambda *_, n=s.name: follower.changed(n))
    dialog = GimpUi.ProcedureDialog.new(procedure, config, "Blended Diffusion")
    dialog.fill_box("advanced-settings", params.advanced(method))
    dialog.get_label("advanced-title", "Advanced", False, False)
    expander = dialog.fill_expander(params.ADVANCED, "advanced-title", False, "advanced-settings")
    # a preset decides them (folded away); typed ones (Custom) are shown
    expander.set_expanded(config.get_property("preset") == settings.CUSTOM)
    dialog.fill(params.layout(method))
    try:
        return dialog.run()
    finally:
        dialog.destroy()


def choice(setting: settings.Setting) -> Gimp.Choice:
    out = Gimp.Choice.new()
    for i, (nick, text) in enumerate(setting.choices):
        out.add(nick, i, text, "")
    return out


def run(procedure, run_mode, image, drawables, config, _data):
    folder = Gimp.directory()
    if run_mode != Gimp.RunMode.NONINTERACTIVE:  # the last run's values, also a failed one's
        params.set_values(config, params.recall(folder))
    if run_mode == Gimp.RunMode.INTERACTIVE and not ask(procedure, config):
        params.remember(folder, params.values(config))  # typed, then cancelled: kept too
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    values = params.values(config)
    params.remember(folder, values)
    try:  # what GIMP checks before the edit (a calling error); the flow makes the request again
        request = settings.request(values)  # for the method the engine's hello names
        group = wording.group_name(request.prompt)
    except ValueError as e:
        return fail(procedure, str(e), Gimp.PDBStatusType.CALLING_ERROR)
    from adapter import GimpHost
    from progress import ProgressWindow, can_show

    from engine.shared import flow

    Gegl.init(None)
    try:
        host = GimpHost(image, drawables, request.layer_only)
    except flow.EditError as e:
        return fail(procedure, str(e))
    window = None
    if run_mode != Gimp.RunMode.NONINTERACTIVE and can_show():
        window = host.window = ProgressWindow(PROCEDURE, group)  # a Cancel the plug-in sees
    else:  # a script's run, or no screen: GIMP's status bar (whose Cancel kills us)
        Gimp.progress_init(f"Blended Diffusion: {values['prompt']}")
    try:
        edit = flow.Edit(host, request, preset=settings.effective(values)["preset"])
        edit.start()
        while edit.tick():
            time.sleep(settings.POLL_SECONDS)
            if window is not None and window.cancelled():  # handles the window's events too
                edit.cancel()
    except Exception as e:  # a bug: still give its message rather than GIMP's "unexpected EOF"
        return fail(procedure, f"Blended Diffusion failed: {type(e).__name__}: {e}")
    finally:
        if window is not None:
            window.close()
        else:
            Gimp.progress_end()
    if edit.state == flow.CANCELLED:
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    if edit.state == flow.FAILED:
        return fail(procedure, wording.GROUP_PREFIX + edit.status.message)
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def run_keep(procedure, run_mode, image, drawables, config, _data):
    """Keep only the visible variant of the active layer's run (one undo group)."""
    from adapter import keep_visible_variant

    from engine.shared.flow import EditError

    try:
        keep_visible_variant(image, drawables)
    except EditError as e:
        return fail(procedure, str(e))
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


class BlendedDiffusion(Gimp.PlugIn):
    def do_set_i18n(self, _name):
        return False  # no translations: also silences GIMP's locale warnings

    def do_query_procedures(self):
        return [PROCEDURE, KEEP]

    def do_create_procedure(self, name):
        if name == KEEP:
            procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_keep,
                                                None)  # fmt: skip
            procedure.set_image_types("*")
            procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
            procedure.set_menu_label("Blended Diffusion: _Keep Visible Variant")
            procedure.add_menu_path("<Image>/Filters/Generic/")
            procedure.set_documentation(
                "Keep only the visible variant of a Blended Diffusion run",
                "Of the run (layer group) the active layer belongs to, the visible variant stays "
                "and the others are removed, in one undo step.",
                name,
            )
            procedure.set_attribution("Blended Diffusion plug-in", "Blended Diffusion plug-in",
                                      "2026")  # fmt: skip
            return procedure
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        procedure.set_image_types("*")  # gray and indexed get a message, not a greyed-out item
        procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        procedure.set_menu_label("_Blended Diffusion...")
        procedure.add_menu_path("<Image>/Filters/Generic/")
        procedure.set_documentation(
            "Change the selection to match a text prompt",
            "Blended Diffusion: the selected part of the visible picture (or of the active layer "
            "alone) is edited to match the prompt by a running engine (python -m engine serve); "
            "each variant comes back as a layer above the active layer, transparent outside the "
            "selection, the best one visible.",
            name,
        )
        procedure.set_attribution("Blended Diffusion plug-in", "Blended Diffusion plug-in", "2026")
        params.add_arguments(procedure, choice, RW)
        return procedure


if __name__ == "__main__":
    Gimp.main(BlendedDiffusion.__gtype__, sys.argv)
