"""Small helpers shared across rooms of the package."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """``$APHRODITE_CACHE_DIR/name``, else ``$XDG_CACHE_HOME/aphrodite/name`` (``~/.cache`` by default)."""
    root = os.environ.get("APHRODITE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aphrodite")
    return Path(root) / name
