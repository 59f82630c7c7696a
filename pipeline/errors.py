"""Errors that reach the user: each names the file it is about and the reason."""

from __future__ import annotations

from pathlib import Path


class SlidepipeError(Exception):
    """A failure the user can act on; `str()` is the one line we print."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class SlideReadError(SlidepipeError):
    """A slide (or one scene of it) cannot be read."""


class ConfigError(SlidepipeError):
    """Settings, flags or the database URL are unusable."""


class StageError(SlidepipeError):
    """A stage cannot run (missing inputs, failed tasks)."""
