"""Blended Diffusion engine.

Imports nothing heavy: the plug-ins import `engine.shared` (the wire, the client and their core)
inside Krita's and GIMP's own Python, which has pyzmq but neither torch nor numpy.
"""

__version__ = "0.1.0"

import warnings

# guided_diffusion's fp16 helpers use torch.cuda.amp decorators that torch now warns about
warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
