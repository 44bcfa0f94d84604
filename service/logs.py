"""The process's log on stderr: lines for a person at a terminal, or one JSON object a line for a log
pipeline (Loki, Elasticsearch, Cloud Logging), which then needs no pattern to find a record's level,
its logger or its traceback.

In JSON each record has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, then
``exc_info`` with the traceback where there is one, and whatever the record was given as ``extra``
(an internal error's ``error_id``, ``rpc``, ``peer`` and ``request_id``: see ``service.servicer``).
"""

from __future__ import annotations

import logging
from typing import TextIO

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) in ``fmt``, in
    place of any handler it had."""
    if level.upper() not in LEVELS:
        raise ValueError(f"log level: {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format: {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
