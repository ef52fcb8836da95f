"""The serial engine: every block in this process, in order.

It is the reference the other engines are tested against.
"""

from __future__ import annotations

from .local import LocalEngine


class SerialEngine(LocalEngine):
    """A :class:`~.local.LocalEngine` that runs its blocks one after another here."""
