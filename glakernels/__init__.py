"""glakernels: gated linear attention (GLA) kernels behind one op, on every device.

>>> from glakernels import gated_linear_attention, available_backends, use_backend

See ``python -m glakernels info`` for the backends that run on this machine.
"""

from ._api import gated_linear_attention
from ._dispatch import BackendNotSupportedError, available_backends, use_backend

__version__ = "0.1.0"

__all__ = [
    "gated_linear_attention",
    "available_backends",
    "use_backend",
    "BackendNotSupportedError",
    "__version__",
]
