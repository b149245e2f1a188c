"""Runs inside real GIMP 3 (python-fu-eval batch): calls the Blended Diffusion plug-in through
the PDB the way a script would, and writes a JSON verdict for tests/test_gimp_real.py.

Environment: BD_CASE (`edit`: a real edit, needs a running engine and, for the undo check, the
GUI under Xvfb with a D-Bus session; `errors`: the failure paths; `cancel`: a long edit for the
test to kill; `visible`: edits whose active layer is a transparent layer over a painted
background, with and without "This layer only", and a group: BD_SCENE says what to paint, the
test checks what the engine received; `preview`: an edit in a display at 400% that waits for the
test's go (BD_READY, BD_GO: files) so that the test can grab the screen before and during the
run; `window`: a long run with the last values in GIMP's GUI, shown in the plug-in's progress
window, whose Cancel the test presses twice: a click, then Escape; `dialog`: a run with the
typed values BD_FIELDS fails, then an interactive run opens the plug-in's dialog, whose OK the
test presses; `latent`: an edit on an engine serving the latent method, BD_FIELDS with a negative
prompt and pixel-only values the run must leave out),
BD_VERDICT (the JSON file),
BD_ENDPOINT (a live engine), BD_DEAD_ENDPOINT (nothing listens), BD_PROMPT, BD_EXPORT (a PNG of
the image with the best result showing), BD_EXPECT (`red`: the best result must be red),
BD_FIELDS (JSON: the plug-in's arguments for the edit, named as in the settings table).
"""

import json
import os
import re
import time
import traceback

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio, GLib  # noqa: E402

PROCEDURE = "python-fu-blended-diffusion"
KEEP = "python-fu-blended-diffusion-keep"
PREVIEW = "Blended Diffusion preview (temporary)"  # the plug-in's temporary layer
W, H = 96, 80  # the canvas
SOURCE = (10, 8, 64, 56)  # the edited layer: x, y (offsets), width, height
ELLIPSE = (44, 26, 40, 30)  # reaches past the layer's right edge: results are clipped to it
FEATHER = 8.0
ENV = os.environ
TYPED = {"preset": "custom", "variants": 2, "steps": 10, "strength": 80, "seed": 7}
verdict = {"case": ENV.get("BD_CASE", "?"), "checks": [], "ok": False}


def check(name, ok, detail=""):
    verdict["checks"].append({"name": name, "ok": bool(ok), "detail": str(detail)})
    return ok


def read(drawable, fmt, rect=None):
    if rect is None:
        rect = (0, 0, drawable.get_width(), drawable.get_height())
    buffer = drawable.get_buffer()
    return bytes(buffer.get(Gegl.Rectangle.new(*rect), 1.0, fmt, Gegl.AbyssPolicy.NONE))


def selection_bytes(image):
    return read(image.get_selection(), "Y u8", (0, 0, W, H))


def make_image(base=Gimp.ImageBaseType.RGB):
    """A grey background and a gradient layer at an offset, with a feathered ellipse selected."""
    image = Gimp.Image.new(W, H, base)
    rgb = base == Gimp.ImageBaseType.RGB
    kinds = (Gimp.ImageType.RGB_IMAGE, Gimp.ImageType.RGBA_IMAGE) if rgb else (
        Gimp.ImageType.GRAY_IMAGE, Gimp.ImageType.GRAYA_IMAGE)  # fmt: skip
    background = Gimp.Layer.new(image, "Background", W, H, kinds[0], 100, Gimp.LayerMode.NORMAL)
    image.insert_layer(background, None, 0)
    background.get_buffer().set(Gegl.Rectangle.new(0, 0, W, H), "R'G'B'A u8",
                                bytes((90, 90, 90, 255)) * (W * H))  # fmt: skip
    x, y, w, h = SOURCE
    source = Gimp.Layer.new(image, "source", w, h, kinds[1], 100, Gimp.LayerMode.NORMAL)
    image.insert_layer(source, None, 0)
    source.set_offsets(x, y)
    pixels = bytearray()
    for j in range(h):
        for i in range(w):
            pixels += bytes((i * 4 % 256, j * 4 % 256, 160, 255))
    source.get_buffer().set(Gegl.Rectangle.new(0, 0, w, h), "R'G'B'A u8", bytes(pixels))
    source.get_buffer().flush()
    image.select_ellipse(Gimp.ChannelOps.REPLACE, *ELLIPSE)
    Gimp.Selection.feather(image, FEATHER)
    return image, source


def call(image, drawable, mode=Gimp.RunMode.NONINTERACTIVE, name=PROCEDURE, **args):
    """(status, message, seconds) of a run of the plug-in (non-interactive: a script's)."""
    procedure = Gimp.get_pdb().lookup_procedure(name)
    if procedure is None:
        raise RuntimeError(f"{PROCEDURE} is not registered: the plug-in did not load")
    config = procedure.create_config()
    config.set_property("run-mode", mode)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [drawable])
    for name, value in args.items():
        config.set_property(name.replace("_", "-"), value)
    start = time.monotonic()
    result = procedure.run(config)  # never raises: the status says
    seconds = time.monotonic() - start
    status = result.index(0)
    message = result.index(1) if result.length() > 1 else ""
    return status, message or "", seconds


def snapshot(image, source):
    return {
        "layers": [layer.get_id() for layer in image.get_layers()],
        "selection": selection_bytes(image),
        "source": read(source, "R'G'B'A u8"),
        "offsets": tuple(source.get_offsets()[1:]),
    }


def before_layers(before):
    return [Gimp.Item.get_by_id(i) for i in before["layers"]]


def same_as(before, image, source, what, keys=("layers", "selection", "source", "offsets")):
    now = snapshot(image, source)
    for key in keys:
        check(f"{what}: {key} unchanged", now[key] == before[key])


def selected_box(selection, area=SOURCE):
    """The exact box of the selection's non-zero pixels inside `area` (image coords)."""
    x0, y0, w, h = area
    xs, ys = [], []
    for y in range(y0, y0 + h):
        row = selection[y * W + x0 : y * W + x0 + w]
        stripped = row.lstrip(b"\0")
        if stripped:
            ys.append(y)
            xs += [x0 + w - len(stripped), x0 + len(row.rstrip(b"\0")) - 1]
    return (min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)


def alpha_errors(layer, selection):
    """(pixels selected 0 but not transparent, pixels whose alpha is not the selection's)."""
    _, ox, oy = layer.get_offsets()
    w, h = layer.get_width(), layer.get_height()
    rgba = read(layer, "R'G'B'A u8")
    leaks = off = soft = 0
    for j in range(h):
        for i in range(w):
            s = selection[(oy + j) * W + ox + i]
            a = rgba[(j * w + i) * 4 + 3]
            leaks += s == 0 and a != 0
            off += abs(a - s) > 1
            soft += 0 < s < 255
    return leaks, off, soft


def mean_colour(layer):
    """Mean R, G, B of the result's fully selected pixels."""
    rgba = read(layer, "R'G'B'A u8")
    inside = [rgba[i : i + 3] for i in range(0, len(rgba), 4) if rgba[i + 3] >= 250]
    n = max(1, len(inside))
    return [round(sum(p[c] for p in inside) / n, 1) for c in range(3)], len(inside)


def gui_action(name):
    """Trigger one of GIMP's own menu actions (edit-undo...) as a user would: the GUI exports
    its actions on D-Bus (org.gtk.Actions); plug-ins have no undo call of their own."""
    bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    bus.call_sync(
        "org.gimp.GIMP.UI", "/org/gimp/GIMP", "org.gtk.Actions", "Activate",
        GLib.Variant("(sava{sv})", (name, [], {})), None, Gio.DBusCallFlags.NONE, 10000, None,
    )  # fmt: skip


def case_edit():
    prompt = ENV.get("BD_PROMPT", "a red circle")
    image, source = make_image()
    display = Gimp.Display.new(image) if ENV.get("BD_UNDO") == "dbus" else None
    before = snapshot(image, source)
    fields = json.loads(ENV.get("BD_FIELDS") or json.dumps(TYPED))
    verdict["fields"] = fields
    image.clean_all()  # undo steps from here on make it dirty; undoing them all, clean again
    status, message, seconds = call(image, source, prompt=prompt, endpoint=ENV["BD_ENDPOINT"],
                                    **fields)  # fmt: skip
    verdict["edit_seconds"] = round(seconds, 2)
    if not check("status success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}"):
        return
    top = image.get_layers()
    groups = [layer for layer in top if layer.get_id() not in before["layers"]]
    check("no preview layer left", PREVIEW not in [la.get_name() for la in top],
          [la.get_name() for la in top])  # fmt: skip
    if not check("one result group", len(groups) == 1 and groups[0].is_group(),
                 [la.get_name() for la in groups]):  # fmt: skip
        return
    group = groups[0]
    check("the group right above the source", top[:2] == [group, source])
    check("the group's name", group.get_name() == f'Blended Diffusion: "{prompt}"',
          group.get_name())  # fmt: skip
    new = layers = group.get_children()
    verdict["layers"] = [
        {"name": la.get_name(), "offsets": list(la.get_offsets()[1:]), "visible": la.get_visible(),
         "size": [la.get_width(), la.get_height()]} for la in layers
    ]  # fmt: skip
    check("two result layers", len(new) == 2, [la.get_name() for la in new])
    quoted = re.escape(f'"{prompt}"')
    for rank, layer in enumerate(new, 1):
        # the model that made it, marked when a demo's or random: wording.made_by's format
        made = r"[\w.-]+( \[demo model\]| \[random weights\])?"
        pattern = rf"{quoted} #{rank} \({made}, CLIP d=\d+\.\d{{3}}\)"
        check(f"name of #{rank}", re.fullmatch(pattern, layer.get_name()), layer.get_name())
    check("best visible, other hidden", [la.get_visible() for la in new] == [True, False])
    selection = before["selection"]
    box = selected_box(selection, (0, 0, W, H))  # the visible picture: past the source layer too
    for rank, layer in enumerate(new, 1):
        got = (*layer.get_offsets()[1:], layer.get_width(), layer.get_height())
        check(f"#{rank} covers the selection on the canvas", got == box, f"{got} vs {box}")
        leaks, off, soft = alpha_errors(layer, selection)
        check(f"#{rank} transparent outside the selection", leaks == 0, f"{leaks} pixels")
        check(f"#{rank} alpha is the soft selection", off == 0 and soft > 0, f"{off} off, {soft}")
    same_as(before, image, source, "after the edit", ("selection", "source", "offsets"))
    colour, count = mean_colour(new[0])
    verdict["best_mean_rgb"], verdict["best_opaque_pixels"] = colour, count
    if ENV.get("BD_EXPECT") == "red":
        r, g, b = colour
        check("best result is red", r > g + 40 and r > b + 40, colour)
    if ENV.get("BD_EXPORT"):  # PNG export flattens what is visible: what the user sees
        Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(
            ENV["BD_EXPORT"]), None)  # fmt: skip
    if display is None:
        verdict["undo"] = "not checked: needs the GUI (BD_UNDO=dbus)"
        return check_choices(image, source, prompt)
    gui_action("edit-undo")
    after = snapshot(image, source)
    check("one undo removes every result layer", after["layers"] == before["layers"],
          [la.get_name() for la in image.get_layers()])  # fmt: skip
    check("one undo leaves the selection (the step before ours)", after["selection"] == selection)
    check("one undo leaves the source", after["source"] == before["source"])
    # reading the visible picture (a scratch image) left no undo step of its own in the image
    check("one undo leaves the image clean: the edit was its only undo step",
          not image.is_dirty())  # fmt: skip
    gui_action("edit-redo")
    check("one redo brings the run back", [la.get_id() for la in image.get_layers()][:1] ==
          [group.get_id()] and len(group.get_children()) == 2)  # fmt: skip
    verdict["undo"] = "edit-undo once: results gone, selection and source kept; edit-redo: back"
    check_keep(image, group, new)
    check_choices(image, source, prompt)
    display.delete()


def check_keep(image, group, variants):
    """The second procedure: only the visible variant of the active layer's run stays, in one
    undo step."""
    variants[0].set_visible(False)
    variants[1].set_visible(True)
    status, message, _ = call(image, variants[0], name=KEEP)
    check("keep: success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
    kept = [la.get_id() for la in group.get_children()]
    check("keep: only the visible variant stays", kept == [variants[1].get_id()], kept)
    gui_action("edit-undo")
    back = [la.get_id() for la in group.get_children()]
    check("keep: one undo brings the others back",
          back == [la.get_id() for la in variants], back)  # fmt: skip
    gui_action("edit-redo")


# the dialog's choices a further edit changes from its default, each adding its own group of
# two: (the checks' name, the argument, its value, the verdict's key); whether the engine ran
# Refine's pass (on by default: every edit before) the test reads in the engine's log
CHOICES = (("fast guidance", "fast_guidance", True, "fast_edit_seconds"),
           ("refine off", "refine", False, "unrefined_edit_seconds"))


def check_choices(image, source, prompt):
    for what, argument, value, key in CHOICES:
        before = [la.get_id() for la in image.get_layers()]
        asked = {**TYPED, argument: value, "endpoint": ENV["BD_ENDPOINT"]}
        status, message, seconds = call(image, source, prompt=prompt, **asked)
        verdict[key] = round(seconds, 2)
        check(f"{what}: success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
        added = [la for la in image.get_layers() if la.get_id() not in before]
        check(f"{what}: a group of two more layers",
              len(added) == 1 and len(added[0].get_children()) == 2,
              [la.get_name() for la in added])  # fmt: skip


def case_errors():
    dead, live = ENV["BD_DEAD_ENDPOINT"], ENV.get("BD_ENDPOINT", ENV["BD_DEAD_ENDPOINT"])
    run = dict(prompt="a red circle", **TYPED)
    image, source = make_image()
    before = snapshot(image, source)
    typed = {"prompt": "a blue square", "preset": "custom", "variants": 3, "steps": 12,
             "strength": 60, "seed": 11, "fast_guidance": True,
             "guidance_weight": 250.0}  # fmt: skip
    status, message, seconds = call(image, source, endpoint=dead, **typed)
    verdict["dead_engine_seconds"] = round(seconds, 2)
    check("no engine: execution error", status == Gimp.PDBStatusType.EXECUTION_ERROR, status)
    check("no engine: says unreachable and where", "unreachable" in message and dead in message,
          message)  # fmt: skip
    check("no engine: gives up within 15 s", seconds < 15, seconds)
    same_as(before, image, source, "no engine")

    # The failed run's values are kept: what the dialog and "Repeat" start from next time.
    with open(os.path.join(Gimp.directory(), "blended-diffusion-last-values.json")) as f:
        kept = json.load(f)
    verdict["kept_after_failure"] = kept
    check("a failed run's values are kept", {k: kept[k] for k in typed} == typed
          and kept["endpoint"] == dead, kept)  # fmt: skip
    status, message, _ = call(image, source, Gimp.RunMode.WITH_LAST_VALS, endpoint=live, **run)
    check("the next run with last values takes them (the failed run's engine address)",
          "unreachable" in message and dead in message, message)  # fmt: skip

    status, message, _ = call(image, source, endpoint=live, **{**run, "prompt": "  "})
    check("no prompt: calling error", status == Gimp.PDBStatusType.CALLING_ERROR, status)
    check("no prompt: asks for one", "prompt" in message, message)
    status, message, _ = call(image, source, endpoint=live, **{**run, "prompt": "a cat " * 90})
    check("a prompt over the limit: says so", "the engine takes 500" in message, message)
    same_as(before, image, source, "bad arguments")

    Gimp.Selection.none(image)
    before = snapshot(image, source)
    status, message, _ = call(image, source, endpoint=live, **run)
    check("no selection: says nothing is selected", "Nothing is selected" in message, message)
    same_as(before, image, source, "no selection")

    image.select_rectangle(Gimp.ChannelOps.REPLACE, 80, 66, 10, 10)  # beside the source layer
    before = snapshot(image, source)  # only the layer alone is read: the selection misses it
    status, message, _ = call(image, source, endpoint=live, **run, layer_only=True)
    check("this layer only, selection off the layer: says so", "outside the layer" in message,
          message)  # fmt: skip
    same_as(before, image, source, "selection off the layer")

    gray, gray_source = make_image(Gimp.ImageBaseType.GRAY)
    before = snapshot(gray, gray_source)
    status, message, _ = call(gray, gray_source, endpoint=live, **run)
    check("grayscale image: refused with the fix", "Image > Mode > RGB" in message, message)
    same_as(before, gray, gray_source, "grayscale image")
    verdict["messages"] = "see checks"


def case_cancel():
    """A long edit whose plug-in process the test kills mid-job, as GIMP's status-bar Cancel
    does."""
    image, source = make_image()
    before = snapshot(image, source)
    status, message, seconds = call(
        image, source, prompt="a red circle", preset="custom", variants=8, steps=1000,
        strength=100, endpoint=ENV["BD_ENDPOINT"],
    )  # fmt: skip
    verdict["killed_after_seconds"], verdict["message"] = round(seconds, 2), message
    check("killed plug-in: the call fails", status != Gimp.PDBStatusType.SUCCESS, status)
    # GIMP kills a cancelled plug-in before it can remove its preview layer: it may be left
    # (outside the undo history), and the next run removes it
    names = [la.get_name() for la in image.get_layers()]
    verdict["preview_left_by_the_kill"] = PREVIEW in names
    check("killed plug-in: nothing else added",
          [n for n in names if n != PREVIEW] == [la.get_name() for la in before_layers(before)])
    call(image, source, prompt="a red circle", endpoint=ENV["BD_DEAD_ENDPOINT"])
    same_as(before, image, source, "killed plug-in, then the next run")


def case_preview():
    """An edit shown in a display, zoomed in; the test grabs the screen before the run (it says
    go once it has) and while the run goes on. The selection goes into the verdict, so the test
    knows where the preview must show and where nothing may change."""
    image, source = make_image()
    display = Gimp.Display.new(image)
    gui_action("view-zoom-4-1")  # 384x320 on screen: the preview is plain to see
    Gimp.displays_flush()
    before = snapshot(image, source)
    verdict["selection"] = before["selection"].hex()
    verdict["size"] = [W, H]
    with open(ENV["BD_READY"], "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(ENV["BD_GO"]):
        if time.monotonic() > deadline:
            check("the test said go within a minute", False)
            return
        time.sleep(0.1)
    fields = json.loads(ENV["BD_FIELDS"])
    status, message, seconds = call(image, source, prompt=ENV["BD_PROMPT"],
                                    endpoint=ENV["BD_ENDPOINT"], **fields)  # fmt: skip
    verdict["edit_seconds"] = round(seconds, 2)
    check("status success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
    names = [la.get_name() for la in image.get_layers()]
    check("no preview layer left", PREVIEW not in names, names)
    added = [la for la in image.get_layers() if la.get_id() not in before["layers"]]
    check("the run's group added, nothing else", len(added) == 1 and added[0].is_group(), names)
    same_as(before, image, source, "after the run", ("selection", "source", "offsets"))
    display.delete()


def fail_at_once():
    """A run with BD_PROMPT, BD_ENDPOINT and BD_FIELDS that fails at once (nothing selected in a
    scratch image): the plug-in keeps its values for the next run with a UI."""
    scratch = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    layer = Gimp.Layer.new(scratch, "scratch", W, H, Gimp.ImageType.RGBA_IMAGE, 100,
                           Gimp.LayerMode.NORMAL)  # fmt: skip
    scratch.insert_layer(layer, None, 0)
    fields = json.loads(ENV["BD_FIELDS"])
    status, message, _ = call(scratch, layer, prompt=ENV["BD_PROMPT"], endpoint=ENV["BD_ENDPOINT"],
                              **fields)  # fmt: skip
    check("the values' run failed at once", "Nothing is selected" in message, message)
    scratch.delete()


def case_window():
    """Two runs with the last values (a long one, kept by a run that failed at once) in the GUI:
    the plug-in shows its progress in a window of its own, and the test presses its Cancel
    mid-run (a click, then Escape). Nothing of the runs may remain: no layer, no undo step, the
    image clean."""
    fail_at_once()
    image, source = make_image()
    display = Gimp.Display.new(image)
    gui_action("view-zoom-4-1")
    background = image.get_layers()[-1]
    background.set_name("Background, renamed")  # the image's last undo step before the run
    image.clean_all()
    before = snapshot(image, source)
    verdict["returned_at"] = []
    for run in ("click", "escape"):
        status, message, _ = call(image, source, Gimp.RunMode.WITH_LAST_VALS)
        verdict["returned_at"].append(time.time())
        check(f"cancelled ({run}): the procedure returns CANCEL",
              status == Gimp.PDBStatusType.CANCEL, f"{status} {message}")  # fmt: skip
    check("cancelled: no preview layer left", PREVIEW not in names(image), names(image))
    same_as(before, image, source, "cancelled")
    check("cancelled: the image is still clean", not image.is_dirty())
    gui_action("edit-undo")  # undoes the last step before the runs: they left none
    check("cancelled: one undo undoes the rename before the runs",
          background.get_name() == "Background" and ids(image.get_layers()) == before["layers"],
          names(image))  # fmt: skip
    display.delete()


def case_connecting():
    """A run with the last values (kept by a run that failed at once) whose engine is dead: its
    progress window must answer while the client waits for the engine, and the Escape the test
    presses half a second in must end the run as cancelled, before the client's 5 s timeout."""
    fail_at_once()
    image, source = make_image()
    display = Gimp.Display.new(image)
    before = snapshot(image, source)
    started = time.time()
    status, message, _ = call(image, source, Gimp.RunMode.WITH_LAST_VALS)
    verdict["started_at"], verdict["returned_at"] = started, time.time()
    check("cancelled while connecting: the procedure returns CANCEL",
          status == Gimp.PDBStatusType.CANCEL, f"{status} {message}")  # fmt: skip
    same_as(before, image, source, "cancelled while connecting")
    display.delete()


def case_dialog():
    """After a run with typed values failed, an interactive run: its dialog opens (the test
    checks it on screen and presses OK, from outside) and the run, with whatever values the
    dialog held, must succeed; the test checks what the engine received."""
    fail_at_once()
    image, source = make_image()
    display = Gimp.Display.new(image)
    before = snapshot(image, source)
    status, message, seconds = call(image, source, Gimp.RunMode.INTERACTIVE)  # no values given
    verdict["dialog_run_seconds"] = round(seconds, 2)
    check("the dialog's run: success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
    added = [la for la in image.get_layers() if la.get_id() not in before["layers"]]
    check("the dialog's run: its group, named by the typed prompt",
          len(added) == 1 and added[0].get_name() == f'Blended Diffusion: "{ENV["BD_PROMPT"]}"',
          names(image))  # fmt: skip
    display.delete()


def visible(image):
    """The image's visible composite, RGBA8 (as the plug-in reads it: a scratch image)."""
    scratch = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    try:
        scratch.undo_disable()
        layer = Gimp.Layer.new_from_visible(image, scratch, "visible")
        scratch.insert_layer(layer, None, 0)
        return read(layer, "R'G'B'A u8", (0, 0, W, H))
    finally:
        scratch.delete()


def case_latent():
    """An edit on an engine serving the latent method, with a negative prompt and pixel-only
    values typed too (BD_FIELDS; the run must leave those out): its group of two layers right
    above the source, each transparent outside the selection, its alpha the selection's; the
    visible picture unchanged outside the selection. The test reads what the engine received."""
    image, source = make_image()
    before = snapshot(image, source)
    shown = visible(image)
    fields = json.loads(ENV["BD_FIELDS"])
    status, message, seconds = call(image, source, prompt=ENV["BD_PROMPT"],
                                    endpoint=ENV["BD_ENDPOINT"], **fields)  # fmt: skip
    verdict["edit_seconds"] = round(seconds, 2)
    if not check("status success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}"):
        return
    top = image.get_layers()
    added = [la for la in top if la.get_id() not in before["layers"]]
    if not check("one result group right above the source", len(added) == 1 and
                 added[0].is_group() and top[:2] == [added[0], source], names(image)):  # fmt: skip
        return
    layers = added[0].get_children()
    verdict["layers"] = [la.get_name() for la in layers]
    check("two result layers, the best visible", [la.get_visible() for la in layers] ==
          [True, False], verdict["layers"])  # fmt: skip
    selection = before["selection"]
    for rank, layer in enumerate(layers, 1):
        leaks, off, soft = alpha_errors(layer, selection)
        check(f"#{rank} transparent outside the selection", leaks == 0, f"{leaks} pixels")
        check(f"#{rank} alpha is the soft selection", off == 0 and soft > 0, f"{off} off, {soft}")
    now = visible(image)
    changed = [i for i in range(W * H) if selection[i] == 0 and now[4 * i : 4 * i + 4] !=
               shown[4 * i : 4 * i + 4]]  # fmt: skip
    check("the visible picture unchanged outside the selection", not changed, len(changed))
    inside = sum(1 for i in range(W * H) if selection[i] == 255 and now[4 * i : 4 * i + 4] !=
                 shown[4 * i : 4 * i + 4])  # fmt: skip
    verdict["changed_inside"] = inside
    check("the selection changed", inside > 0, inside)
    same_as(before, image, source, "after the latent edit", ("selection", "source", "offsets"))


def filled(image, name, rgba_at, parent=None):
    """A canvas-sized RGBA layer on top of `parent` with pixel (x, y) = rgba_at(x, y)."""
    layer = Gimp.Layer.new(image, name, W, H, Gimp.ImageType.RGBA_IMAGE, 100,
                           Gimp.LayerMode.NORMAL)  # fmt: skip
    image.insert_layer(layer, parent, 0)
    data = b"".join(bytes(rgba_at(x, y)) for y in range(H) for x in range(W))
    layer.get_buffer().set(Gegl.Rectangle.new(0, 0, W, H), "R'G'B'A u8", data)
    layer.get_buffer().flush()
    layer.update(0, 0, W, H)
    return layer


def case_visible():
    """A painted background (R = 2x, G = 3y, B = 90) under a transparent "Ink" layer with one
    stroke; Ink active. Then a group on top, active. Each edit succeeds and lands right above
    the active layer; the test reads what the engine received for each prompt."""
    scene = json.loads(ENV["BD_SCENE"])
    ix, iy, iw, ih = scene["ink"]
    image = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    background = filled(image, "Background", lambda x, y: (2 * x, 3 * y, 90, 255))
    ink = filled(image, "Ink", lambda x, y: scene["ink_rgba"] if ix <= x < ix + iw and
                 iy <= y < iy + ih else (0, 0, 0, 0))  # fmt: skip
    image.select_rectangle(Gimp.ChannelOps.REPLACE, *scene["selection"])
    one = {**TYPED, "variants": 1, "steps": 4}
    images = len(Gimp.get_images())
    for prompt, fields in ((scene["visible_prompt"], {}),
                           (scene["layer_prompt"], {"layer_only": True})):  # fmt: skip
        before = ids(image.get_layers())
        status, message, _ = call(image, ink, prompt=prompt, endpoint=ENV["BD_ENDPOINT"],
                                  **one, **fields)  # fmt: skip
        check(f"{prompt}: success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
        now = ids(image.get_layers())
        added = [i for i in now if i not in before]
        above = now[now.index(ink.get_id()) - 1]
        check(f"{prompt}: one layer, right above the active layer",
              len(added) == 1 and above == added[0], names(image))  # fmt: skip
    try:
        group = Gimp.GroupLayer.new(image, "Group")
    except TypeError:  # the name argument came in a later 3.0
        group = Gimp.GroupLayer.new(image)
    image.insert_layer(group, None, 0)
    filled(image, "Inside", lambda x, y: (40, 200, 40, 255) if x < 20 else (0, 0, 0, 0), group)
    before = ids(image.get_layers())
    prompt = scene["group_prompt"]
    status, message, _ = call(image, group, prompt=prompt, endpoint=ENV["BD_ENDPOINT"], **one,
                              **scene["shaping"])  # fmt: skip
    check(f"{prompt}: success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
    now = ids(image.get_layers())
    check(f"{prompt}: the result right above the group, beside it (top level)",
          len(now) == len(before) + 1 and now[1:] == before, names(image))  # fmt: skip
    result = image.get_layers()[0]
    _, x, y = result.get_offsets()
    gx, gy, gw, gh = scene["grown"]
    box = [x, y, result.get_width(), result.get_height()]
    check(f"{prompt}: grown and feathered, the result covers the grown selection",
          x <= gx and y <= gy and x + box[2] >= gx + gw and y + box[3] >= gy + gh, box)  # fmt: skip
    prompt = scene["group_alone_prompt"]  # a group's buffer is what it shows on its own
    status, message, _ = call(image, group, prompt=prompt, endpoint=ENV["BD_ENDPOINT"], **one,
                              layer_only=True)  # fmt: skip
    check(f"{prompt}: success", status == Gimp.PDBStatusType.SUCCESS, f"{status} {message}")
    check("the group's own layers unchanged", len(group.get_children()) == 1)
    check("the background unchanged", read(background, "R'G'B'A u8")[:4] == bytes((0, 0, 90, 255)))
    verdict["layers"] = names(image)
    check("no scratch image left behind", len(Gimp.get_images()) == images, Gimp.get_images())


def ids(layers):
    return [la.get_id() for la in layers]


def names(image):
    return [la.get_name() for la in image.get_layers()]


try:
    Gegl.init(None)
    cases = {"edit": case_edit, "errors": case_errors, "cancel": case_cancel,
             "visible": case_visible, "preview": case_preview, "window": case_window,
             "connecting": case_connecting, "latent": case_latent,
             "dialog": case_dialog}  # fmt: skip
    cases[ENV.get("BD_CASE", "edit")]()
    verdict["ok"] = bool(verdict["checks"]) and all(c["ok"] for c in verdict["checks"])
except Exception:
    verdict["error"] = traceback.format_exc()
finally:
    with open(ENV["BD_VERDICT"], "w") as out:
        json.dump(verdict, out, indent=1)
