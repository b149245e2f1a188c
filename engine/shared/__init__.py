"""What both plug-ins share, host-agnostic: pure Python, importable without pyzmq.

GIMP registers its procedure before any connection, so nothing here imports `engine.shared.client`
at module level. install.py copies this package beside the client into each plug-in's `_lib`.

- `settings`: the settings table both UIs are built from, presets, request building/validation.
- `geometry`: which part of the picture is sent, within the engine's size limit.
- `estimate`: time before and during a run, from the step times the engine measured.
- `wording`: the messages and names the artist reads (errors, layers, connection state).
"""
