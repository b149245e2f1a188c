"""Drives the Blended Diffusion plug-in inside a real Krita, as a user would, and writes a verdict.

Enabled next to the plug-in by tests/test_krita_real.py, which passes a JSON config file in
$BD_DRIVER_CONFIG. Once the main window exists, the scenario runs as a generator stepped by
QTimer.singleShot, so Krita's event loop (and the plug-in's own 20 ms timer) keeps running while
the driver waits. Every check lands in the verdict JSON; the driver then quits Krita.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import traceback

from krita import Extension, Krita, Selection

try:
    from PyQt5.QtCore import QTimer
    from PyQt5.QtWidgets import QAbstractItemView, QApplication, QToolButton
except ImportError:
    from PyQt6.QtCore import QTimer
    from PyQt6.QtWidgets import QAbstractItemView, QApplication, QToolButton

W, H = 96, 64
SOURCE_SHIFT = (-3, -2)  # the source layer is moved: results must still line up with the canvas
# what the first Generate types unless the test says (names as in the settings table)
TYPED = {"preset": "custom", "variants": 2, "steps": 40, "strength": 80, "seed": 7}
SELECTION = (58, 14, 48, 34)  # reaches past the right edge: the plug-in must clamp it
FEATHER = 3


class Driver:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.checks: list[dict] = []
        self.facts: dict = {"krita_version": Krita.instance().version()}

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": str(detail)[:2000]})
        # so far, for a Krita that never gets to the verdict (a hang, the outer timeout)
        with open(os.path.join(self.config["out"], "checks-so-far.json"), "w") as f:
            json.dump(self.checks, f, indent=1)
        return ok

    # -- helpers -----------------------------------------------------------------------------

    def docker(self):
        window = Krita.instance().activeWindow()
        return next(d for d in window.dockers() if d.objectName() == "blended_diffusion_docker")

    @staticmethod
    def history_rows() -> int:
        """Commands on the undo stack, from the History docker's list (+1 for "<empty>")."""
        for d in Krita.instance().dockers():
            if d.objectName() == "History":
                views = d.findChildren(QAbstractItemView)
                if views and views[0].model() is not None:
                    return views[0].model().rowCount()
        return -1

    @staticmethod
    def names(node) -> list[str]:
        return [f"{c.name()}<{c.type()}>" for c in node.childNodes()]

    def wait(self, condition, timeout: float, step: float = 0.05):
        """Yield until `condition()` or `timeout`; records the longest gap between steps (a
        frozen GUI thread shows up as a long gap)."""
        start = last = time.monotonic()
        self.longest_gap = 0.0
        while not condition():
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            if now - start > timeout:
                return False
            yield step
        return True

    def new_document(self, name: str, model: str = "RGBA", depth: str = "U8"):
        app = Krita.instance()
        doc = app.createDocument(W, H, name, model, depth, "", 72.0)
        app.activeWindow().addView(doc)
        QApplication.processEvents()
        return doc

    def select(self, doc, rect=SELECTION, feather: int = FEATHER) -> None:
        sel = Selection()
        sel.select(*rect, 255)
        if feather:
            sel.feather(feather)
        doc.setSelection(sel)

    def press_generate(self, docker, endpoint: str, prompt: str, **fields) -> None:
        """Type into the docker's fields (named as in the settings table), press Generate."""
        docker.set_values({"prompt": prompt, "endpoint": endpoint, **(fields or TYPED)})
        docker.generate_button.click()

    # -- the scenario ------------------------------------------------------------------------

    def scenario(self):
        from engine.shared import settings  # from the plug-in's _lib, on sys.path once it loaded

        cfg, app = self.config, Krita.instance()
        area = (tuple(cfg.get("selection", SELECTION)), cfg.get("feather", FEATHER))
        yield 0.5
        doc = self.new_document("bd-test")
        yield 0.3
        docker = self.docker()
        docker.show()
        source = doc.createNode("Source", "paintlayer")
        sw, sh = W - SOURCE_SHIFT[0], H - SOURCE_SHIFT[1]
        color = bytes(cfg.get("source_bgra", [200, 140, 60, 255]))
        source.setPixelData(color * (sw * sh), 0, 0, sw, sh)
        doc.rootNode().addChildNode(source, None)
        source.move(*SOURCE_SHIFT)
        doc.setActiveNode(source)
        self.select(doc, *area)
        yield 0.3
        doc.waitForDone()
        self.check("the source layer is active", doc.activeNode().name() == "Source")
        action = app.action("blended_diffusion_generate")
        self.check("the action exists", action is not None)
        self.facts["shortcut"] = action.shortcut().toString() if action else ""
        self.check("the action has a default shortcut", self.facts["shortcut"] != "")

        source_before = bytes(source.pixelData(0, 0, W, H))
        sel_before = bytes(doc.selection().pixelData(0, 0, W, H))
        s = doc.selection()
        bounds_before = (s.x(), s.y(), s.width(), s.height())
        tree_before = self.names(doc.rootNode())
        rows_before = self.history_rows()

        # 0. Before any Generate: the docker shows what the engine runs and where.
        docker.set_values({"endpoint": cfg["endpoint"]})
        docker.check_engine()  # what pressing Enter in the Engine field does
        yield from self.wait(lambda: bool(docker.info), 15)
        line = docker.connection.text()
        self.facts["connection_before_generate"] = line
        self.facts["expected_before_first_edit"] = docker.expected.text()
        self.check("before Generate: the engine's model shown", cfg["model_label"] in line, line)
        self.check("before Generate: its device shown", "CPU" in line, line)
        self.screenshot(docker, cfg, "before")

        # 1. A real job on the running engine, started with the docker's own button.
        started = time.monotonic()
        seen_steps: set[int] = set()
        seen_texts: list[str] = []

        def finished() -> bool:
            seen_steps.add(docker.progress_bar.value())
            if docker.status.text() not in seen_texts:
                seen_texts.append(docker.status.text())
            return not docker.busy

        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **cfg.get("fields", {}))
        done = yield from self.wait(finished, cfg.get("deadline", 240))
        self.facts["generate_seconds"] = round(time.monotonic() - started, 2)
        self.facts["generate_longest_gap"] = round(self.longest_gap, 3)
        state = docker.edit.state
        self.facts["status"] = docker.status.text()
        self.check("the job finished in time", done, state)
        self.check("the job succeeded", state == "done", docker.status.text())
        self.check("the progress bar moved", len(seen_steps - {0}) >= 1, sorted(seen_steps))
        self.facts["status_during_run"] = seen_texts[-4:]
        self.check("during the run: time left shown", any(" left" in t for t in seen_texts),
                   seen_texts)  # fmt: skip
        yield 0.2
        doc.waitForDone()
        active = doc.activeNode()
        self.check("the source layer is active again", active and active.name() == "Source")
        job = docker.edit.job
        self.results(doc, job, cfg, tree_before)
        self.check(
            "the source layer is unchanged", bytes(source.pixelData(0, 0, W, H)) == source_before
        )
        s = doc.selection()
        self.check(
            "the selection is unchanged",
            s is not None and bytes(s.pixelData(0, 0, W, H)) == sel_before,
        )
        self.check(
            "the selection bounds are unchanged",
            s is not None and (s.x(), s.y(), s.width(), s.height()) == bounds_before,
        )
        self.facts["undo_steps"] = self.history_rows() - rows_before
        self.check(
            "one Generate is one undo step", self.facts["undo_steps"] == 1, self.facts["undo_steps"]
        )
        self.screenshot(docker, cfg, "after")
        app.action("edit_undo").trigger()
        yield 0.5
        doc.waitForDone()
        self.check(
            "one undo removes the whole result",
            self.names(doc.rootNode()) == tree_before,
            self.names(doc.rootNode()),
        )
        app.action("edit_redo").trigger()
        yield 0.3
        doc.waitForDone()
        doc.setActiveNode(source)  # redo activates the group again
        yield 0.1

        # 1b. The engine measured the first run: the next one has an estimate before it starts.
        yield from self.wait(lambda: "Expected: about" in docker.expected.text(), 15)
        self.facts["expected_after_first_edit"] = docker.expected.text()
        self.check("an estimate before the next run", "Expected: about" in docker.expected.text(),
                   docker.expected.text())  # fmt: skip

        # 1c. Fast guidance reaches the engine's settings; a second Generate pressed while the
        # first runs is queued and runs after it.
        fast = {"preset": "custom", "variants": 1, "steps": 10, "strength": 80, "seed": 7,
                "fast_guidance": True}  # fmt: skip
        docker.set_values(fast)
        sent = settings.request(docker.values()).settings
        self.check("fast guidance is sent", sent.get("guidance_mode") == "fast", sent)
        groups = len(doc.rootNode().childNodes())
        # the first long enough to be running still on a quiet machine (8 steps took < 0.1 s)
        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **fast | {"steps": 400})
        yield 0.1
        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **fast)
        queued = docker.status.text()
        self.check("a second Generate is queued", "Queued" in queued, queued)
        done = yield from self.wait(
            lambda: not docker.busy and not docker._waiting, 180
        )
        self.check(
            "both Generates succeed",
            done and docker.edit.state == "done",
            docker.status.text(),
        )
        added = len(doc.rootNode().childNodes()) - groups
        self.check("they add one group each", added == 2, added)
        docker.fields["fast_guidance"].setChecked(False)
        yield 0.2
        doc.setActiveNode(source)
        yield 0.1

        # 1d. Refine large selections: before the run the estimate names the pass; once the
        # engine accepted it, the started line gives its steps and tiles a step; the progress
        # bar counts the pass's steps; the result comes back as one group.
        yield from self.refined_run(doc, docker, cfg, fast)
        doc.setActiveNode(source)
        yield 0.1

        # 1e. Previews and the run history (issue 17).
        yield from self.previews_and_history(doc, docker, cfg)
        doc.setActiveNode(source)
        yield 0.1

        # 2. No selection, through the action (the shortcut's path): a message, nothing added.
        app.action("deselect").trigger()
        yield 0.3
        doc.waitForDone()
        tree = self.names(doc.rootNode())
        self.check("deselect left no selection", doc.selection() is None, doc.selection())
        action.trigger()
        yield 0.2
        self.check(
            "no selection: a message",
            "selection" in docker.status.text().lower(),
            docker.status.text(),
        )
        self.check(
            "no selection: nothing added",
            self.names(doc.rootNode()) == tree and not docker.busy,
        )

        # 3. An empty selection.
        doc.setSelection(Selection())
        action.trigger()
        yield 0.2
        self.check(
            "empty selection: a message",
            "empty" in docker.status.text().lower(),
            docker.status.text(),
        )

        # 4. Cancel a long job after its first step.
        self.select(doc, *area)
        doc.setActiveNode(source)
        yield 0.2
        tree = self.names(doc.rootNode())
        long_job = {"preset": "custom", "variants": 1, "steps": 1000, "strength": 100}
        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **long_job)
        yield from self.wait(
            lambda: docker.edit.status.step >= 1 or not docker.busy, 60
        )
        docker.cancel_button.click()
        done = yield from self.wait(lambda: not docker.busy, 30)
        self.check(
            "cancel stops the job",
            done and docker.edit.state == "cancelled",
            docker.status.text(),
        )
        self.check(
            "cancel adds nothing", self.names(doc.rootNode()) == tree, self.names(doc.rootNode())
        )

        # 5. A prompt over the engine's limit (from its hello): said before sending, nothing added.
        self.press_generate(docker, cfg["endpoint"], "a red ball " * 60)
        done = yield from self.wait(lambda: not docker.busy, 30)
        text = docker.status.text()
        self.check("over the limit: shown", done and "the engine takes 500" in text, text)
        self.check("over the limit: nothing added", self.names(doc.rootNode()) == tree)

        # 6. No engine at the endpoint: an error in the docker, within the client's timeout,
        # with Krita's GUI thread never blocked meanwhile.
        started = time.monotonic()
        self.press_generate(docker, cfg["dead_endpoint"], cfg["prompt"])
        done = yield from self.wait(lambda: not docker.busy, 30)
        self.facts["dead_engine_seconds"] = round(time.monotonic() - started, 2)
        self.facts["dead_engine_longest_gap"] = round(self.longest_gap, 3)
        self.facts["dead_engine_message"] = docker.status.text()
        self.check(
            "dead engine: failed",
            done and docker.edit.state == "failed",
            docker.status.text(),
        )
        self.check(
            "dead engine: says unreachable",
            "unreachable" in docker.status.text(),
            docker.status.text(),
        )
        self.check("dead engine: within the timeout", self.facts["dead_engine_seconds"] < 5.0 + 3.0)
        self.check("dead engine: Krita never froze", self.longest_gap < 1.0, self.longest_gap)
        self.check(
            "dead engine: nothing added",
            self.names(doc.rootNode()) == tree,
            self.names(doc.rootNode()),
        )

        # 7. Colour models the engine cannot take.
        for model, depth in (("CMYKA", "U8"), ("RGBA", "U16")):
            other = self.new_document(f"bd-{model}-{depth}", model, depth)
            yield 0.3
            self.select(other)
            other.setActiveNode(other.rootNode().childNodes()[0])
            tree = self.names(other.rootNode())
            docker.generate_button.click()
            yield 0.2
            text = docker.status.text()
            self.check(f"{model}/{depth}: a message", f"{model}/{depth}" in text, text)
            self.check(f"{model}/{depth}: nothing added", self.names(other.rootNode()) == tree)
            other.setModified(False)

        # 8. What the artist sees goes in, whatever the active layer.
        if cfg.get("scene"):
            yield from self.visible_picture(docker, cfg, cfg["scene"])

    def latent_scenario(self):
        """An engine serving the latent method (tiny-latent): before any Generate the docker
        shows its settings (Negative prompt, Scheduler, Guidance) and hides the pixel method's
        (Fast guidance among them); a Generate with a negative prompt, and pixel-only values set
        that must not be sent, adds the results, nothing outside the selection changed."""
        cfg = self.config
        yield 0.5
        doc = self.new_document("bd-latent")
        yield 0.3
        docker = self.docker()
        docker.show()
        source = doc.createNode("Source", "paintlayer")
        bgra = b"".join(bytes((160, 3 * y, 2 * x, 255)) for y in range(H) for x in range(W))
        source.setPixelData(bgra, 0, 0, W, H)
        doc.rootNode().addChildNode(source, None)
        doc.setActiveNode(source)
        self.select(doc)
        yield 0.3
        doc.refreshProjection()
        doc.waitForDone()
        tree_before = self.names(doc.rootNode())
        shown_before = bytes(doc.pixelData(0, 0, W, H))  # the projection: what the artist sees
        selection = bytes(doc.selection().pixelData(0, 0, W, H))

        docker.set_values({"endpoint": cfg["endpoint"]})
        docker.check_engine()
        yield from self.wait(lambda: bool(docker.info), 15)
        self.facts["hello_method"] = docker.info.get("method")
        self.facts["connection"] = docker.connection.text()
        self.check("the engine serves the latent method", docker.info.get("method") == "latent",
                   docker.info.get("method"))  # fmt: skip
        self.check("the engine's model shown", cfg["model_label"] in self.facts["connection"],
                   self.facts["connection"])  # fmt: skip
        docker.show_advanced.setChecked(True)
        yield 0.3
        hidden = sorted(n for n, field in docker.fields.items() if field.isHidden())
        self.facts["hidden_fields"] = hidden
        self.check("the pixel method's settings hidden",
                   hidden == ["fast_guidance", "guidance_weight", "refine"], hidden)  # fmt: skip
        self.check("Fast guidance not on screen", not docker.fields["fast_guidance"].isVisible())
        on_screen = {n: docker.fields[n].isVisible() for n in ("negative_prompt", "scheduler",
                     "guidance", "steps")}  # fmt: skip
        self.check("Negative prompt, Scheduler, Guidance on screen", all(on_screen.values()),
                   on_screen)  # fmt: skip
        self.screenshot(docker, cfg, "latent")

        fields = cfg["fields"]
        docker.set_values({"prompt": cfg["prompt"], **fields})
        yield 0.2
        self.facts["expected"] = docker.expected.text()
        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **fields)
        started = time.monotonic()
        done = yield from self.wait(lambda: not docker.busy, cfg.get("deadline", 120))
        self.facts["generate_seconds"] = round(time.monotonic() - started, 2)
        self.facts["status"] = docker.status.text()
        self.check("the latent edit succeeded", done and docker.edit.state == "done",
                   docker.status.text())  # fmt: skip
        sent = docker.edit.request.settings
        self.facts["sent"] = sent
        self.check("sent: the negative prompt, no pixel-only setting",
                   sent.get("negative_prompt") == fields["negative_prompt"]
                   and not {"guidance_mode", "guidance_weight", "refine"} & set(sent),
                   sent)  # fmt: skip
        yield 0.3
        doc.refreshProjection()
        doc.waitForDone()
        self.results(doc, docker.edit.job, cfg, tree_before)
        after = bytes(doc.pixelData(0, 0, W, H))
        differs = [after[4 * i : 4 * i + 4] != shown_before[4 * i : 4 * i + 4]
                   for i in range(W * H)]  # fmt: skip
        changed = sum(1 for m, d in zip(selection, differs, strict=True) if m == 0 and d)
        self.check("the visible picture unchanged outside the selection", changed == 0, changed)
        inside = sum(1 for m, d in zip(selection, differs, strict=True) if m == 255 and d)
        self.facts["changed_inside"] = inside
        self.check("the selection changed", inside > 0, inside)
        self.check("the source layer unchanged", bytes(source.pixelData(0, 0, W, H)) == bgra)
        self.screenshot(docker, cfg, "latent-after")
        doc.setModified(False)

    def visible_picture(self, docker, cfg: dict, scene: dict):
        """What the artist sees goes in (tests/hosts/visible.py's scene): a transparent "Ink"
        layer over a painted background is active, with and without "This layer only"; then a
        group is active. The test reads what the engine received for each prompt."""
        from engine.shared.wording import group_name

        doc = self.new_document("bd-visible")
        yield 0.3
        background = doc.rootNode().childNodes()[0]  # a new document's Background paint layer
        bgra = b"".join(bytes((90, 3 * y, 2 * x, 255)) for y in range(H) for x in range(W))
        background.setPixelData(bgra, 0, 0, W, H)
        ink = doc.createNode("Ink", "paintlayer")
        doc.rootNode().addChildNode(ink, background)
        x, y, w, h = scene["ink"]
        r, g, b, a = scene["ink_rgba"]
        ink.setPixelData(bytes((b, g, r, a)) * (w * h), x, y, w, h)
        doc.refreshProjection()  # a script's setPixelData leaves the projection as it was
        self.select(doc, tuple(scene["selection"]), 0)
        one = {"preset": "custom", "variants": 1, "steps": 4, "strength": 80, "seed": 7}
        for prompt, layer_only in ((scene["visible_prompt"], False),
                                   (scene["layer_prompt"], True)):  # fmt: skip
            doc.setActiveNode(ink)
            yield 0.3
            doc.waitForDone()
            before = self.names(doc.rootNode())
            self.press_generate(docker, cfg["endpoint"], prompt, **one, layer_only=layer_only)
            done = yield from self.wait(lambda: not docker.busy, 120)
            self.check(f"{prompt}: succeeded", done and docker.edit.state == "done",
                       docker.status.text())  # fmt: skip
            after = self.names(doc.rootNode())
            above = after[after.index("Ink<paintlayer>") + 1]
            ours = f"{group_name(prompt)}<grouplayer>"
            self.check(f"{prompt}: its group right above the active layer",
                       len(after) == len(before) + 1 and above == ours, after)  # fmt: skip
        group = doc.createGroupLayer("Group")
        inside = doc.createNode("Inside", "paintlayer")
        inside.setPixelData(bytes((40, 200, 40, 255)) * (10 * H), 0, 0, 10, H)
        group.setChildNodes([inside])
        doc.rootNode().addChildNode(group, None)  # on top
        doc.refreshProjection()
        doc.setActiveNode(group)
        yield 0.3
        doc.waitForDone()
        prompt = scene["group_prompt"]
        self.press_generate(docker, cfg["endpoint"], prompt, **one, layer_only=False,
                            **scene["shaping"])  # fmt: skip
        done = yield from self.wait(lambda: not docker.busy, 120)
        self.check(f"{prompt}: succeeded", done and docker.edit.state == "done",
                   docker.status.text())  # fmt: skip
        after = self.names(doc.rootNode())
        self.facts["visible_case_layers"] = after
        self.check(f"{prompt}: its group right above the group, beside it",
                   after[-2:] == ["Group<grouplayer>", f"{group_name(prompt)}<grouplayer>"],
                   after)  # fmt: skip
        best = doc.rootNode().childNodes()[-1].childNodes()[-1].bounds()
        box = [best.x(), best.y(), best.width(), best.height()]
        gx, gy, gw, gh = scene["grown"]
        self.check(f"{prompt}: grown and feathered, the result covers the grown selection",
                   box[0] <= gx and box[1] <= gy and box[0] + box[2] >= gx + gw
                   and box[1] + box[3] >= gy + gh, box)  # fmt: skip
        docker.set_values({"grow": 0, "feather": 0})
        doc.setActiveNode(group)
        yield 0.3
        prompt = scene["group_alone_prompt"]  # a group's projection: what it shows on its own
        self.press_generate(docker, cfg["endpoint"], prompt, **one, layer_only=True)
        done = yield from self.wait(lambda: not docker.busy, 120)
        self.check(f"{prompt}: succeeded", done and docker.edit.state == "done",
                   docker.status.text())  # fmt: skip
        self.check("the group's own layers unchanged", self.names(group) == ["Inside<paintlayer>"],
                   self.names(group))  # fmt: skip
        docker.show_advanced.setChecked(True)  # Grow, Feather, This layer only in the screenshot
        self.screenshot(docker, cfg, "visible")
        docker.set_values({"layer_only": False})
        doc.setModified(False)

    def refined_run(self, doc, docker, cfg: dict, fast: dict):
        from engine.shared import request, settings

        self.check("refine: on by default", docker.values()["refine"] is True, docker.values())
        docker.set_values(fast)
        yield 0.2
        before = docker.expected.text()
        self.facts["expected_with_refine"] = before
        self.check("refine: the estimate before the run names the pass",
                   "then a refinement pass" in before, before)  # fmt: skip
        shown, message, maxima = [], docker._message, set()
        docker._message = lambda text, state="": (shown.append(text), message(text, state))[1]
        groups = len(doc.rootNode().childNodes())

        def finished() -> bool:
            maxima.add(docker.progress_bar.maximum())
            return not docker.busy

        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **fast)
        done = yield from self.wait(finished, 120)
        del docker._message  # the docker's own method again
        job, sent = docker.edit.job, settings.request(docker.values()).settings
        self.facts["refined_run"] = {"sent_refine": sent.get("refine"), "total": job.total,
                                     "tiles": job.refine_tiles, "shown": shown[:4]}  # fmt: skip
        self.check("refine: the run succeeds", done and docker.edit.state == "done",
                   docker.status.text())  # fmt: skip
        guided = request.check(sent).steps_run  # the base pass's, at the strength sent
        self.check("refine: sent, and the engine runs the pass over tiles",
                   sent.get("refine") is True and job.total > guided and job.refine_tiles > 1,
                   self.facts["refined_run"])  # fmt: skip
        pass_line = f"then {job.total - guided} refinement step"  # ", ... over N tiles"
        pass_line = re.compile(re.escape(pass_line) + rf"s? over {job.refine_tiles} tiles")
        self.check("refine: the started line gives the pass's steps and tiles",
                   any(pass_line.search(t) for t in shown), shown[:4])  # fmt: skip
        self.check("refine: the started line has an estimate (the engine timed fast steps)",
                   any("Expected: about" in t for t in shown), shown[:4])  # fmt: skip
        self.check("refine: the progress bar counts the pass's steps", job.total in maxima,
                   sorted(maxima))  # fmt: skip
        added = len(doc.rootNode().childNodes()) - groups
        self.check("refine: one group added", added == 1, added)
        docker.set_values({"refine": False})
        yield 0.2

    @staticmethod
    def thumbnails(docker, running: bool) -> list:
        """The docker's thumbnail buttons of the running run (tooltips say the step) or of
        finished runs (they say the rank)."""
        found = [b for b in docker.findChildren(QToolButton)
                 if b.objectName() == "blended_diffusion_thumbnail" and b.isVisible()]  # fmt: skip
        return [b for b in found if ("step " in b.toolTip()) == running]

    def previews_and_history(self, doc, docker, cfg: dict):
        """Thumbnails appear and change mid-run (sampled twice) with nothing of them in the
        document; then a variant shown alone, Keep and Discard in one undo step each."""
        from engine.shared import settings

        app = Krita.instance()
        tree, rows = self.names(doc.rootNode()), self.history_rows()
        # the demo model guided (its previews show the edit emerging: the README's picture);
        # the tiny random model unguided (its guided run NaNs)
        weight = -1.0 if cfg["model_label"] == "demo" else 0
        slow = {"preset": "custom", "variants": 2, "steps": 40, "strength": 100, "seed": 11,
                "guidance_weight": weight}  # fmt: skip
        held = Held(cfg["received"], cfg["prompt"])  # the engine holds the job at each preview
        self.press_generate(docker, cfg["endpoint"], cfg["prompt"], **slow)
        shown = yield from self.wait(
            lambda: held.count() == 1 and len(self.thumbnails(docker, True)) == 2, 60
        )
        first = [(b.toolTip(), b.icon().pixmap(b.iconSize()).toImage())
                 for b in self.thumbnails(docker, True)]  # fmt: skip
        self.facts["thumbnails_first"] = [t for t, _ in first]
        self.check("mid-run: two thumbnails appear", shown, self.facts["thumbnails_first"])
        self.check("mid-run: they hold pictures", all(not i.isNull() for _, i in first))
        sizes = sorted(b.iconSize().width() for b in self.thumbnails(docker, True))
        self.check("mid-run: the best so far is larger", sizes == [48, 96], sizes)
        self.check("mid-run: nothing of the preview in the document",
                   self.names(doc.rootNode()) == tree, self.names(doc.rootNode()))  # fmt: skip
        self.check("mid-run: no undo step", self.history_rows() == rows, self.history_rows())

        def changed() -> bool:
            now = [(b.toolTip(), b.icon().pixmap(b.iconSize()).toImage())
                   for b in self.thumbnails(docker, True)]  # fmt: skip
            return len(now) == 2 and any(
                t != t0 and i != i0 for (t, i), (t0, i0) in zip(now, first, strict=True)
            )

        held.release()  # to the next preview, held again while the docker shows it
        moved = yield from self.wait(lambda: held.count() == 2 and changed(), 60)
        self.facts["thumbnails_second"] = [b.toolTip() for b in self.thumbnails(docker, True)]
        self.check("mid-run: the thumbnails change", moved, self.facts["thumbnails_second"])
        self.screenshot(docker, cfg, "preview")  # the second sample: the edit emerging
        self.check("mid-run: still nothing in the document", self.names(doc.rootNode()) == tree)
        held.stop()
        done = yield from self.wait(lambda: not docker.busy, 240)
        self.check("the previewed run succeeds",
                   done and docker.edit.state == "done", docker.status.text())  # fmt: skip
        job = docker.edit.job  # Refine unticked after 1d: over the same large selection
        self.check("refine off: sent off, and the engine runs no pass",
                   job.refine_tiles == 0 and job.total == slow["steps"]  # strength 100: no skip
                   and settings.request(docker.values()).settings["refine"] is False,
                   (job.total, job.refine_tiles))  # fmt: skip
        yield 0.3
        self.check("no preview thumbnail left", not self.thumbnails(docker, True))
        results = self.thumbnails(docker, False)
        ranks = [b.toolTip().split()[0] for b in results]
        self.check("the thumbnails became the results", ranks[:2] == ["#1", "#2"], ranks)
        self.check("one undo step for the run", self.history_rows() == rows + 1)
        def above_source():  # where a run's group goes (the source's wrapper changes)
            nodes = doc.rootNode().childNodes()
            return nodes[[n.name() for n in nodes].index("Source") + 1]

        group = above_source()
        layers = group.childNodes()[::-1]  # best first
        second = (layers[1].name(), bytes(layers[1].pixelData(0, 0, W, H)))
        results[1].click()  # rank 2: shown alone
        yield 0.3
        self.check("a click shows that variant alone",
                   [n.visible() for n in layers] == [False, True])  # fmt: skip
        before = self.history_rows()
        docker.runs.buttons["keep"].click()
        yield 0.5
        doc.waitForDone()
        kept = [above_source()]
        self.facts["after_keep"] = self.names(doc.rootNode())
        self.check("Keep: one undo step", self.history_rows() == before + 1 and
                   len(self.names(doc.rootNode())) == len(tree) + 1,
                   self.history_rows() - before)  # fmt: skip
        self.check("Keep: only that variant remains, with its name",
                   [(n.name(), n.type()) for n in kept] == [(second[0], "paintlayer")],
                   self.facts["after_keep"])  # fmt: skip
        self.check("Keep: its pixels", kept and bytes(kept[0].pixelData(0, 0, W, H)) == second[1])
        app.action("edit_undo").trigger()
        yield 0.5
        doc.waitForDone()
        restored = len(above_source().childNodes())
        self.check("Keep: one undo brings the run back", restored == 2, restored)
        app.action("edit_redo").trigger()
        yield 0.5
        doc.waitForDone()
        tree = self.names(doc.rootNode())
        docker.runs.buttons["again"].click()  # same settings, a new seed
        done = yield from self.wait(lambda: not docker.busy, 240)
        self.check("Again: a run", done and docker.edit.state == "done",
                   docker.status.text())  # fmt: skip
        yield 0.3
        self.thumbnails(docker, False)[0].click()  # the new run's best
        yield 0.2
        chosen = bytes(above_source().childNodes()[-1].pixelData(0, 0, W, H))  # top: the best
        tree = self.names(doc.rootNode())
        docker.runs.buttons["vary"].click()  # that variant's seed, one variant
        done = yield from self.wait(lambda: not docker.busy, 240)
        self.check("Vary: a run", done and docker.edit.state == "done",
                   docker.status.text())  # fmt: skip
        yield 0.3
        varied = above_source().childNodes()
        self.check("Vary: one variant, from the chosen one's seed: its pixels, nothing changed",
                   len(varied) == 1 and bytes(varied[0].pixelData(0, 0, W, H)) == chosen,
                   [n.name() for n in varied])  # fmt: skip
        self.thumbnails(docker, False)[0].click()  # the varied run's variant
        yield 0.2
        before = self.history_rows()
        docker.runs.buttons["discard"].click()
        yield 0.5
        doc.waitForDone()
        self.check("Discard: one undo step", self.history_rows() == before + 1,
                   self.history_rows() - before)  # fmt: skip
        self.check("Discard: the run is gone", self.names(doc.rootNode()) == tree,
                   self.names(doc.rootNode()))  # fmt: skip

    def results(self, doc, job, cfg: dict, tree_before: list[str]) -> None:
        from engine.shared import settings
        from engine.shared.wording import group_name, layer_name, made_by

        root = doc.rootNode().childNodes()
        names = [c.name() for c in root]
        self.facts["layers_after"] = self.names(doc.rootNode())
        if not self.check("a group was added", len(root) == len(tree_before) + 1, names):
            return
        group = root[names.index("Source") + 1] if "Source" in names else None
        self.check(
            "the group sits right above the source",
            group is not None and group.type() == "grouplayer",
            names,
        )
        if group is None or job is None:
            return
        self.check("the group's name", group.name() == group_name(cfg["prompt"]), group.name())
        layers = group.childNodes()[::-1]  # childNodes is bottom first: best first now
        by = made_by(job.model, job.weights)
        expected = [layer_name(cfg["prompt"], v.rank, v.distance, by) for v in job.variants]
        named = [n.name() for n in layers]
        self.check("the layers name the model that made them", job.model and all(
            f"({by}, CLIP d=" in n for n in named), (by, named))  # fmt: skip
        variants = settings.effective(cfg.get("fields") or TYPED)["variants"]
        self.check("one layer per variant", len(layers) == variants, (len(layers), variants))
        self.check(
            "layer names from the core's layer_name",
            [n.name() for n in layers] == expected,
            [n.name() for n in layers],
        )
        self.check(
            "only the best is visible",
            [n.visible() for n in layers] == [True] + [False] * (len(layers) - 1),
        )
        mask = bytes(doc.selection().pixelData(0, 0, W, H))
        self.facts["variants"] = []
        for node in layers:
            data = bytes(node.pixelData(0, 0, W, H))
            alpha = data[3::4]
            outside = sum(1 for a, m in zip(alpha, mask, strict=True) if m == 0 and a != 0)
            differs = sum(1 for a, m in zip(alpha, mask, strict=True) if a != m)
            inside = [i for i, a in enumerate(alpha) if a > 128]
            mean = [
                round(sum(data[4 * i + c] for i in inside) / max(1, len(inside)), 1)
                for c in (2, 1, 0)
            ]
            red = sum(1 for i in inside if data[4 * i + 2] > max(data[4 * i], data[4 * i + 1]) + 60)
            self.facts["variants"].append(
                {
                    "name": node.name(),
                    "outside_opaque": outside,
                    "alpha_differs_from_selection": differs,
                    "opaque_pixels": len(inside),
                    "mean_rgb_inside": mean,
                    "red_fraction": round(red / max(1, len(inside)), 3),
                }
            )
            self.check(f"{node.name()}: transparent outside the selection", outside == 0, outside)
            self.check(f"{node.name()}: its alpha is the selection's", differs == 0, differs)
            self.check(f"{node.name()}: has pixels", len(inside) > 0)

    def screenshot(self, docker, cfg: dict, when: str) -> None:
        out = cfg["out"]
        docker.grab().save(os.path.join(out, f"krita-docker-{when}.png"))
        window = Krita.instance().activeWindow().qwindow()
        window.grab().save(os.path.join(out, f"krita-window-{when}.png"))



class Held:
    """Asks the recording engine (tests/recording_engine.py, its files in `folder`) to hold each
    job of `prompt` right after each progress with previews, so that the driver samples the
    docker mid-run rather than racing the job's end."""

    def __init__(self, folder: str, prompt: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        for name in ("held", "release"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
        with open(os.path.join(folder, "hold"), "w") as f:
            f.write(prompt)

    def count(self) -> int:
        """The holds so far."""
        with contextlib.suppress(FileNotFoundError), open(os.path.join(self.folder, "held")) as f:
            return len(f.read().splitlines())
        return 0

    def release(self) -> None:
        """The held job goes on (to its next preview)."""
        path = os.path.join(self.folder, "release")
        with open(path + ".tmp", "w") as f:
            f.write(str(self.count()))
        os.replace(path + ".tmp", path)

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.folder, "hold"))


def run_scenario() -> None:
    config = json.load(open(os.environ["BD_DRIVER_CONFIG"]))
    driver = Driver(config)
    steps = driver.latent_scenario() if config.get("scenario") == "latent" else driver.scenario()

    def finish(error: str = "") -> None:
        verdict = {"checks": driver.checks, "facts": driver.facts, "error": error}
        verdict["ok"] = not error and all(c["ok"] for c in driver.checks)
        with open(os.path.join(config["out"], "verdict.json"), "w") as f:
            json.dump(verdict, f, indent=1)
        app = Krita.instance()
        for doc in app.documents():
            doc.setModified(False)
        app.action("file_quit").trigger()

    def advance() -> None:
        try:
            delay = next(steps)
        except StopIteration:
            return finish()
        except Exception:
            return finish(traceback.format_exc())
        QTimer.singleShot(int(delay * 1000), advance)

    advance()


class DriverExtension(Extension):
    def setup(self) -> None:
        Krita.instance().notifier().windowCreated.connect(
            lambda: QTimer.singleShot(300, run_scenario)
        )

    def createActions(self, window) -> None:
        pass


Krita.instance().addExtension(DriverExtension(Krita.instance()))
