"""Job modules for tests/test_allowlist.py: a package a node allows (``allowed``), a module it must never run code
of (``elsewhere``) and one that must never even be imported (``sidefx``).

With ``ALLOWLIST_MARKERS`` set to a directory, modules leave a file there when imported and jobs when run, so a test
sees what a worker in another process did.
"""

from __future__ import annotations

import os
from pathlib import Path


def mark(name: str) -> None:
    """Leave the marker ``name`` (``imported-<module>`` or ``ran-<job>``) in $ALLOWLIST_MARKERS, if set."""
    directory = os.environ.get("ALLOWLIST_MARKERS")
    if directory:
        (Path(directory) / name).touch()
