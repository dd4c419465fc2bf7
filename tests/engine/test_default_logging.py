"""``LLM()`` shows Aphrodite's INFO records by default, as vLLM does, and stays out of an application's
own logging set-up (``APHRODITE_CONFIGURE_LOGGING=0``, or handlers already on the root logger)."""
from __future__ import annotations

import os
import subprocess
import sys

SNIPPET = """
import logging, sys
if sys.argv[1] == "app":
    logging.basicConfig(level=logging.WARNING, format="APP %(message)s")
from aphrodite.utils import configure_default_logging
configure_default_logging()
logging.getLogger("aphrodite.engine.engine").info("engine says hello")
logging.getLogger("someone.else").warning("other library")
"""


def _stderr(mode: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SNIPPET, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_info_records_shown_by_default():
    err = _stderr("plain")
    assert "INFO" in err and "aphrodite.engine.engine: engine says hello" in err


def test_switch_off_and_application_config_win():
    assert "engine says hello" not in _stderr("plain", APHRODITE_CONFIGURE_LOGGING="0")
    err = _stderr("app")
    assert "engine says hello" not in err           # the app chose WARNING for the root
    assert "APP other library" in err               # and its format is untouched
