"""Small helpers shared across rooms of the package."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def configure_default_logging() -> None:
    """Show Aphrodite's INFO records on stderr, as vLLM does by default for ``LLM()`` (start-up, memory,
    KV cache), unless the application configured logging itself or ``APHRODITE_CONFIGURE_LOGGING=0``
    (vLLM's ``VLLM_CONFIGURE_LOGGING``). Only the ``aphrodite`` logger is touched, never the root."""
    if os.environ.get("APHRODITE_CONFIGURE_LOGGING", "1").strip() in ("0", "false", "False", ""):
        return
    ours = logging.getLogger("aphrodite")
    if logging.getLogger().handlers or ours.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def cache_dir(name: str) -> Path:
    """``$APHRODITE_CACHE_DIR/name``, else ``$XDG_CACHE_HOME/aphrodite/name`` (``~/.cache`` by default)."""
    root = os.environ.get("APHRODITE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aphrodite")
    return Path(root) / name
