"""Debug switches. This is the only module that reads environment variables; options are never configured here."""

from __future__ import annotations

import os
from pathlib import Path


def debug() -> bool:
    """TXC_DEBUG=1: keep full tracebacks in the CLI and log every pass's graph."""
    return os.environ.get("TXC_DEBUG", "") not in ("", "0", "false", "no")


def dump_dir() -> Path | None:
    """TXC_DUMP_DIR=path: write each pass's graph (readable Python) there."""
    value = os.environ.get("TXC_DUMP_DIR", "")
    return Path(value) if value else None
