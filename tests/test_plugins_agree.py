"""Both plug-ins' settings come from the one table: the Krita docker's fields and the GIMP
procedure's arguments have its names, defaults, ranges, tooltips and choices (fakes of Qt, Krita
and GIMP: tests/helpers/hosts.py). What they do with them is one flow: tests/test_flow.py."""

from __future__ import annotations

from engine.shared import settings
from tests.helpers.hosts import gimp_config, gimp_params, krita_plugin


def test_the_settings_table_drives_both_uis(monkeypatch):
    docker = krita_plugin(monkeypatch).docker
    fields = {s.name: docker.make_field(s) for s in settings.TABLE}
    procedure, _ = gimp_config(gimp_params(monkeypatch))
    gimp = {name.replace("-", "_"): arg for name, arg in procedure.args.items()}
    assert list(fields) == list(gimp) == [s.name for s in settings.TABLE]
    for s in settings.TABLE:
        widget, arg = fields[s.name], gimp[s.name]
        assert docker.read_field(widget, s) == arg["default"] == s.default, s.name
        assert widget.tip == arg["tooltip"] == s.tooltip
        if s.low is not None:
            assert (widget.low, widget.high) == (arg["low"], arg["high"]) == (s.low, s.high)
            assert widget.special == s.special
        if s.choices:
            assert [d for _, d in widget.items] == list(arg["choices"]) == [c for c, _ in s.choices]
