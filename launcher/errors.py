"""User-facing errors: the CLI prints these as a message and exits non-zero, never a traceback."""

from __future__ import annotations

# The worker's exit codes, which the schedulers act on (the sbatch script requeues on 75; the
# Kubernetes podFailurePolicy ignores 75 and fails the index on 2). training.agent passes them on.
EXIT_USER_ERROR = 2  # a user error before or outside training: retrying cannot help
EXIT_PREEMPTED = 75  # stopped on request after checkpointing: requeue me


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
