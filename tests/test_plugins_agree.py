"""Both plug-ins' settings come from the one table: the Krita docker's fields and the GIMP
procedure's arguments have its names, defaults, ranges, tooltips and choices, and both show the
settings the engine's method takes (fakes of Qt, Krita and GIMP: tests/helpers/hosts.py). What
they do with them is one flow: tests/test_flow.py."""

from __future__ import annotations

import pytest

from engine.shared import flow, settings
from tests.helpers.client import HELLO, FakeClient
from tests.helpers.engine import until
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


@pytest.mark.parametrize("method", ["pixel", "latent", None])
def test_both_uis_show_the_served_methods_settings(monkeypatch, method):
    """Krita's docker hides the fields the engine's method does not take; GIMP's dialog, once
    the engine answered, holds only the ones it takes (None: an older engine's hello)."""
    hello = HELLO if method is None else HELLO | {"method": method}
    monkeypatch.setattr(flow, "open_client", lambda endpoint: FakeClient(info=hello))
    docker = krita_plugin(monkeypatch).docker.BlendedDiffusionDocker()
    until(lambda: docker._tick() or docker.info, 10, "the docker's hello", every=0.002)
    krita = [name for name, field in docker.fields.items() if not field.isHidden()]
    params = gimp_params(monkeypatch)
    shown = method or "pixel"
    gimp = [r for r in params.layout(shown) if r != params.ADVANCED] + params.advanced(shown)
    assert sorted(krita) == sorted(n.replace("-", "_") for n in gimp)
    assert krita == list(settings.shown(method))
