"""``MOE_RECIPE_DS_LOG``: the level of DeepSpeed's own log lines, read by the launcher (recipe/launcher.py, which
refuses an unknown name before any rank starts) and by every rank (recipe/training/telemetry.py).

Imports neither torch nor deepspeed: both callers set the filter before deepspeed is imported, since the import
itself logs (the accelerator it detects) and resets the logger's level, which a filter outlives."""
from __future__ import annotations

import logging
from collections.abc import Mapping

LOG_ENV = "MOE_RECIPE_DS_LOG"
DEFAULT_LEVEL = logging.ERROR
DS_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
             logging.CRITICAL: "critical"}  # the names DeepSpeed's --log_level accepts


def requested_level(environ: Mapping[str, str]) -> int:
    """The level ``MOE_RECIPE_DS_LOG`` names (default: errors only); ValueError for a name that is none of them."""
    name = environ.get(LOG_ENV, "").strip()
    if not name:
        return DEFAULT_LEVEL
    level = getattr(logging, name.upper(), None)
    if level not in DS_LEVELS:
        raise ValueError(f"{LOG_ENV}={name!r} is not a log level; use one of {', '.join(DS_LEVELS.values())}")
    return level


class _BelowLevel(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def drop_deepspeed_records_below(level: int) -> None:
    """DeepSpeed's log records below ``level`` are dropped in this process (set once; later calls keep it)."""
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _BelowLevel) for f in ds_logger.filters):
        ds_logger.addFilter(_BelowLevel(level))
