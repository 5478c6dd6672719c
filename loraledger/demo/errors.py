"""The one error a demo step raises."""

from __future__ import annotations


class DemoError(RuntimeError):
    """A demo step that cannot go on; the message says which piece failed and where to look."""
