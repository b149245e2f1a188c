"""What both plug-ins and the engine share: pure Python (standard library; the client adds
pyzmq), shipped whole into each plug-in's `_lib` by the installer.

GIMP registers its procedure before any connection, so nothing here imports `client` at module
level but `client` itself.

- `protocol`: the wire format: message kinds, header JSON, pixel frames, codes, limits.
- `request`: the request schema: every setting once, its range, and what follows from it.
- `geometry`: every geometric figure: the window sent, the context box, the model canvas at one
  scale, the refinement canvas and its tiles.
- `client`: connect, hello, submit, progress, cancel; the keep-alive at hello's interval.
- `flow`: the edit flow once for both hosts, driven by `tick()` over a small host interface.
- `settings`: the settings table both UIs are built from, presets, the request a UI's values make.
- `estimate`: time before and during a run, from the step times the engine measured.
- `wording`: the messages and names the artist reads (errors, layers, connection state).
- `history`, `png`: a document's runs; a pure-Python PNG reader for the previews.
"""
