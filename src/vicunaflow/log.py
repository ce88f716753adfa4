"""Logging set up once for the CLI: rich on a terminal, plain lines in Snakemake's log files."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("VICUNAFLOW_LOG_LEVEL", "INFO")
    rank = os.environ.get("RANK")
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        # stderr: stdout carries what a verb prints on purpose (chat replies, preview JSON).
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s" + (f" [rank {rank}]" if rank else "") + ": %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
