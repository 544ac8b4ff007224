"""On/off switches read from environment variables, all parsed the same way."""

from __future__ import annotations

import os

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """Whether switch ``name`` is on: unset or empty is ``default``; ``0``, ``false``, ``no``
    or ``off`` (any case) is off; ``1``, ``true``, ``yes`` or ``on`` is on; anything else
    raises (a typo must not flip a switch the wrong way)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"environment variable {name} must be one of 0/1, false/true, no/yes, off/on; got {value!r}")
