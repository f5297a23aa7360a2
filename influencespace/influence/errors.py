"""Errors of the influence stage (each says what was wrong and what to change)."""

from influencespace.errors import InfluenceSpaceError


class InfluenceError(InfluenceSpaceError):
    """The influence computation cannot go on with these inputs or settings."""
