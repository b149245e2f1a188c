"""The procedure's arguments, made from the shared settings table (engine/shared/settings.py),
and the values remembered between runs.

GIMP registers a procedure's arguments once, before any engine is asked: every setting of
either method is an argument, a setting only one method takes labelled with its models ("ADM
models only", "Stable Diffusion models only"), and the run sends only what the engine's method
takes (the shared flow makes the request again for its hello). The dialog shows the served
method's settings when the engine answers before it opens, else every one with those labels.

No gi import: GIMP registers the procedure from it before any connection (and before pyzmq is
needed); the tests drive it with a fake procedure and config. GIMP saves an interactive run's
values only when it succeeds; the plug-in keeps the values of every run itself, so a failed or
cancelled run gives them back in the dialog and to "Repeat".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from engine.shared.settings import BY_NAME, TABLE, Setting, dumps, effective, loads, only_for

REMEMBERED = "blended-diffusion-last-values.json"  # in GIMP's profile folder


def prop(setting: Setting) -> str:
    """The GObject property name of a setting (GIMP's config spells '_' as '-')."""
    return setting.name.replace("_", "-")


def label(setting: Setting) -> str:
    text = setting.label
    if setting.special:
        text += f" ({setting.low:g}: {setting.special})"
    note = only_for(setting)
    return f"{text} [{note}]" if note else text


def add_arguments(procedure: Any, choice: Callable[[Setting], Any], flags: Any) -> None:
    """One argument a setting, in the table's order; `choice(setting)` makes a Gimp.Choice."""
    for s in TABLE:
        name, text = prop(s), label(s)
        if s.choices:
            procedure.add_choice_argument(name, text, s.tooltip, choice(s), s.default, flags)
        elif s.kind is str:
            procedure.add_string_argument(name, text, s.tooltip, s.default, flags)
        elif s.kind is bool:
            procedure.add_boolean_argument(name, text, s.tooltip, s.default, flags)
        elif s.kind is int:
            procedure.add_int_argument(name, text, s.tooltip, s.low, s.high, s.default, flags)
        else:
            procedure.add_double_argument(name, text, s.tooltip, s.low, s.high, s.default, flags)


ADVANCED = "advanced"  # the dialog's expander holding the Advanced settings


def _for(method: str | None) -> list[Setting]:
    """The settings an engine serving `method` takes (None: not known, every one)."""
    return [s for s in TABLE if method is None or method in s.methods]


def layout(method: str | None = None) -> list[str]:
    """The dialog's rows: the properties of the settings `method` takes (None: the method is
    not known, every setting) in the table's order, the Advanced ones folded into one expander
    where the first of them stands."""
    rows: list[str] = []
    for s in _for(method):
        row = ADVANCED if s.advanced else prop(s)
        if row not in rows:
            rows.append(row)
    return rows


def advanced(method: str | None = None) -> list[str]:
    return [prop(s) for s in _for(method) if s.advanced]


def values(config: Any) -> dict[str, Any]:
    return {s.name: config.get_property(prop(s)) for s in TABLE}


def set_values(config: Any, changes: Mapping[str, Any]) -> None:
    for name, value in changes.items():
        config.set_property(prop(BY_NAME[name]), value)


def remember(folder: str, current: Mapping[str, Any]) -> None:
    """Keep a run's values (before it runs: a failure must not lose them)."""
    path = os.path.join(folder, REMEMBERED)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(dumps(current))
    os.replace(path + ".tmp", path)


def recall(folder: str) -> dict[str, Any]:
    """What a run with a UI starts from: the last run's values as far as they are still valid
    (the defaults before any), its preset's values in the Advanced ones, so the dialog shows
    what would run (without, a first dialog said Draft over the table's 4 variants x 100)."""
    try:
        with open(os.path.join(folder, REMEMBERED), encoding="utf-8") as f:
            return effective(loads(f.read()))
    except OSError:
        return effective({})
