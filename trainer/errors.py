"""Exit codes, the declared errors that carry them, and the one-line error format: one home for all
command lines (trainer, evaluator, launchers). See ARCHITECTURE.md, "Exit codes".

An exception a command line maps to an exit code is a subclass of :class:`SnganError` and carries
its ``exit_code``. Anything else (a bare ``ValueError`` or ``FileNotFoundError`` raised by a bug)
is not caught by :func:`exit_status`, so it keeps its traceback and the process exits 1: a bug never
looks like bad input. Errors of the layers below (``data_pipelines``, ``models``: they import
nothing from here) are mapped explicitly by :data:`DATA_INPUT_ERRORS`.

This module imports nothing but the standard library, so the evaluator may use it without loading
any training code.
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple, Type

EXIT_OK = 0
EXIT_DIVERGED = 1        # a NaN/inf loss (also: a bug, with its traceback)
EXIT_BAD_INPUT = 2       # config, data, checkpoint, run folder in use, memory too small for the batch
EXIT_STORAGE = 74        # EX_IOERR: the run folder could not be written
EXIT_PREEMPTED = 75      # EX_TEMPFAIL: stopped by a signal after a checkpoint; run again to continue


class SnganError(Exception):
    """An error a command line reports as one line and exits with :attr:`exit_code`."""

    exit_code: int = EXIT_DIVERGED


class BadInput(SnganError):
    """Bad input (a value, file, folder or checkpoint the user gave): one line naming it and the remedy."""

    exit_code = EXIT_BAD_INPUT


class UsageError(BadInput, ValueError):
    """A bad command-line value or combination of values (a ``ValueError``, as before)."""


class MissingInput(BadInput, FileNotFoundError):
    """A file or folder the user named does not exist (a ``FileNotFoundError``, as before)."""


class StorageFailure(SnganError):
    """A write failed (full disk, quota, I/O error); what was written before is intact."""

    exit_code = EXIT_STORAGE


class Preempted(SnganError):
    """Stopped by a signal after writing a checkpoint; the same command continues."""

    exit_code = EXIT_PREEMPTED


class Diverged(SnganError):
    """Training produced a non-finite loss."""

    exit_code = EXIT_DIVERGED


# The bad-input exceptions of the layers below (``data_pipelines`` and ``models``, which cannot
# subclass :class:`BadInput`): the data layer's declared ``DataInputError`` (with ``DataMissing``,
# ``DataUnreadable``, ``DataVerifyError``), the preparation's own error types, and a path that is not
# a generator (``models.export``), mapped to exit 2 explicitly.
DATA_INPUT_ERRORS = (("data_pipelines.errors", "DataInputError"), ("data_pipelines.archives", "ArchiveError"),
                     ("data_pipelines.sources", "SourceError"), ("data_pipelines.imaging", "UndecodableImage"),
                     ("models.export", "GeneratorFileError"))


def data_input_errors() -> Tuple[Type[BaseException], ...]:
    """The classes of :data:`DATA_INPUT_ERRORS` that are loaded (an exception of a module that was
    never imported cannot have been raised, so nothing is imported here)."""
    found = (getattr(sys.modules.get(mod), name, None) for mod, name in DATA_INPUT_ERRORS)
    return tuple(cls for cls in found if isinstance(cls, type))


def exit_code_of(exc: BaseException) -> Optional[int]:
    """The declared exit code of ``exc``, or None for an undeclared (bug) exception."""
    if isinstance(exc, SnganError):
        return exc.exit_code
    if isinstance(exc, data_input_errors()):
        return EXIT_BAD_INPUT
    return None


def one_line(exc: BaseException, *, first_line: bool = False) -> str:
    """The message of ``exc`` on one line, without a data-loader worker's re-raised traceback
    (``first_line``: only its first line, else its lines joined by spaces)."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a data loader worker
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    if not text:
        return type(exc).__name__
    return text.splitlines()[0] if first_line else " ".join(text.split("\n"))


def report(exc: BaseException, prefix: str = "error: ", *, first_line: bool = False) -> int:
    """Print ``exc`` as one line on stderr; returns its declared exit code (bad input when undeclared)."""
    print(f"{prefix}{one_line(exc, first_line=first_line)}", file=sys.stderr, flush=True)
    code = exit_code_of(exc)
    return EXIT_BAD_INPUT if code is None else code
