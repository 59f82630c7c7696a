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


class UsageError(SlidepipeError):
    """The command line asks for something that cannot be (e.g. an animal id that is not a plain
    directory name): the CLI prints the one line and exits with status 2, like argparse."""


class DatabaseError(ConfigError):
    """The database failed while a command used it (disk full, locked, server gone): one line
    naming the database (password hidden) and the driver's reason; the CLI exits with status 3."""


class StageBusy(SlidepipeError):
    """Another live runner holds the animal's stage (`db.locks`): the CLI prints the one line
    naming it and exits with status 4, so a script can tell "try later" from a failure."""
