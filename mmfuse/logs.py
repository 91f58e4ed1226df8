"""structlog set-up shared by the daemon process and every actor process."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(format: str = "console", level: str = "info") -> None:
    renderer = (structlog.processors.JSONRenderer() if format == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),  # the stderr of when a logger is made
        cache_logger_on_first_use=False,
    )


def worth_a_line(count: int) -> bool:
    """Whether the count-th occurrence of something is logged: the 1st to 10th, then every 10th up to 100, then
    every 100th and so on, so a flood cannot flood the log."""
    return count <= 10 or count % 10 ** (len(str(count)) - 1) == 0


class Tally:
    """Counts events by reason and says when one is worth a log line (`worth_a_line`)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, reason: str) -> bool:
        count = self.counts.get(reason, 0) + 1
        self.counts[reason] = count
        return worth_a_line(count)

    def total(self) -> int:
        return sum(self.counts.values())
