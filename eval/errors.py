"""One rule for the evaluator's command lines: bad input is one line on stderr and exit 2.

Missing or wrong files, unknown metrics, folders without images, broken generators and statistics
files that no data can have raise one of the ``ValueError`` subclasses of eval/ (or
``FileNotFoundError`` / ``ExtractorUnavailable``); :func:`cli` turns them into
``error: <message>`` and status 2, so no traceback reaches the user for an input mistake.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

EXIT_BAD_INPUT = 2


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a data loader worker
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return " ".join(text.split("\n")) if text else type(exc).__name__


def cli(main: Callable[[Optional[list]], Optional[int]], argv: Optional[list] = None) -> int:
    """Run an evaluator ``main(argv)``; input errors become one line and exit 2."""
    from .extractors import ExtractorUnavailable
    try:
        status = main(argv)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ExtractorUnavailable) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return int(status or 0)
