"""Blended Diffusion engine.

Imports nothing heavy: the plug-ins import `engine.protocol` and `engine.client` inside Krita's
and GIMP's own Python, which has pyzmq but neither torch nor numpy.
"""

__version__ = "0.1.0"
