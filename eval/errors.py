"""One rule for the evaluator's command lines: bad input is one line on stderr and exit 2.

Missing or wrong files, unknown metrics, folders without images, broken generators and statistics
files that no data can have raise a declared error (a subclass of ``trainer.errors.BadInput``:
``CheckpointError``, ``DataError``, ``StatsError``, ``NonFiniteSamples``, ``ExtractorUnavailable``,
``UsageError``, ``MissingInput``, or one of the data layer's mapped errors); :func:`cli` turns them
into ``error: <message>`` and their exit code. Anything else is a bug: it keeps its traceback and
the process exits 1. The exit codes and the one-line format live in ``trainer/errors.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

from trainer.errors import EXIT_BAD_INPUT, exit_code_of, one_line, report

__all__ = ["EXIT_BAD_INPUT", "cli", "one_line"]


def cli(main: Callable[[Optional[list]], Optional[int]], argv: Optional[list] = None) -> int:
    """Run an evaluator ``main(argv)``; declared input errors become one line and their exit code."""
    try:
        status = main(argv)
    except Exception as exc:
        if exit_code_of(exc) is None:
            raise  # a bug: its traceback, exit 1
        return report(exc)
    return int(status or 0)
