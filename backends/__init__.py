"""Built-in backends, installed as ``glakernels.backends``.

Each sub-package holds one backend: a :class:`glakernels._backend.Backend` subclass declaring
what it supports, registered with :func:`glakernels._dispatch.register_backend` when the
sub-package is imported. Importing a sub-package must stay cheap: heavy dependencies (triton,
cupy, numba) are imported inside the backend's methods.

To add a backend: create ``backends/<name>/__init__.py`` with the class and its registration,
and add the sub-package name to ``BUILTIN`` below. Tests and benchmarks then pick it up.
"""

import importlib

#: Import order only affects the order of listings; automatic selection uses each backend's
#: declared ``auto_priority``.
BUILTIN = ("pytorch", "numba", "triton", "cupy")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
