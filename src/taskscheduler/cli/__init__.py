"""The command line, its terminal display and the demo: the only code that imports click and rich."""

from __future__ import annotations

from .commands import main
from .group import cli

__all__ = ["cli", "main"]
