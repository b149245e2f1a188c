"""The procedure's arguments, made from the shared settings table (engine/shared/settings.py),
and the values remembered between runs.

No gi import: GIMP registers the procedure from it before any connection (and before pyzmq is
needed); the tests drive it with a fake procedure and config. GIMP saves an interactive run's
values only when it succeeds; the plug-in keeps the values of every run itself, so a failed or
cancelled run gives them back in the dialog and to "Repeat".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from engine.shared.settings import BY_NAME, TABLE, Setting, dumps, effective, loads

REMEMBERED = "blended-diffusion-last-values.json"  # in GIMP's profile folder


def prop(setting: Setting) -> str:
    """The GObject property name of a setting (GIMP's config spells '_' as '-')."""
    return setting.name.replace("_", "-")


def label(setting: Setting) -> str:
    if not setting.special:
        return setting.label
    return f"{setting.label} ({setting.low:g}: {setting.special})"


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


def layout() -> list[str]:
    """The dialog's rows: the settings' properties in the table's order, the Advanced ones
    folded into one expander where the first of them stands."""
    rows: list[str] = []
    for s in TABLE:
        row = ADVANCED if s.advanced else prop(s)
        if row not in rows:
            rows.append(row)
    return rows


def advanced() -> list[str]:
    return [prop(s) for s in TABLE if s.advanced]


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
