"""User-facing errors: the CLI prints these as a message and exits non-zero, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad job file, missing input, unreachable bucket).

    `problems` holds every problem found, so that all of them are reported at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [])

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.message}\n{lines}"


class ConfigError(UserError):
    """The job file or an override is malformed or invalid."""


class InputError(UserError):
    """An input the job names (model, subject images, manifest) is missing or unusable."""


class StorageError(UserError):
    """A bucket or path could not be read or written after retries."""
