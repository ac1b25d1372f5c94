"""The data layer's declared bad-input errors: data that cannot be read as configured (a missing or
empty ``data.path``, a manifest of another format, shards that cannot feed the ranks, an unknown
backend). ``trainer/errors.py`` maps them to exit 2 with one line; the data layer imports nothing
from above it, so it declares them here. Anything else raised here is a bug and keeps its traceback.
"""

from __future__ import annotations


class DataInputError(ValueError):
    """The configured data cannot be used; the message names the value and the remedy."""


class DataMissing(DataInputError, FileNotFoundError):
    """A file or shard the configuration names does not exist or cannot be fetched."""
