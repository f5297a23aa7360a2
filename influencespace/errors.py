"""Domain exceptions. Every message says what was wrong and what to do about it.

The CLI turns any :class:`InfluenceSpaceError` into a one-paragraph message and exit code 2,
never a raw traceback; anything else is a bug and keeps its traceback.
"""


class InfluenceSpaceError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(InfluenceSpaceError):
    """A configuration key or value is invalid."""


class StorageError(InfluenceSpaceError):
    """A URI cannot be resolved, read or written."""


class InputDataError(InfluenceSpaceError):
    """Input data has the wrong schema or cannot be used at all (row-level problems are rejected, not raised)."""


class StageStateError(InfluenceSpaceError):
    """A stage directory holds results that do not match the requested run (e.g. a changed config)."""


class MissingDependencyError(InfluenceSpaceError):
    """An optional package or system file needed for this step is not installed."""
