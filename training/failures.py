"""What one subject's failure is: contained (the subject fails, the worker goes on) or fatal (the
process cannot go on), and the one line that the status ledger keeps of it.

Any exception raised while a subject trains fails that subject alone: a TypeError deep inside
diffusers on one odd image set must not strand the subject as `running` or leave the shard's
later subjects untried. Only what leaves the process unusable ends the worker: the host out of
memory, a broken process group, a CUDA context in an error state.
"""

from __future__ import annotations

import traceback

# a failed collective leaves the process group unusable; CUDA errors are sticky for the context
_FATAL_MESSAGES = ("CUDA error", "NCCL error", "CUBLAS_STATUS", "device-side assert")


def is_fatal(exc: BaseException) -> bool:
    if not isinstance(exc, Exception) or isinstance(exc, MemoryError):
        return True
    try:
        from torch.distributed import DistBackendError, DistNetworkError, DistStoreError
    except ImportError:  # an older torch without them
        fatal_types: tuple[type, ...] = ()
    else:
        fatal_types = (DistBackendError, DistNetworkError, DistStoreError)
    return isinstance(exc, fatal_types) or any(m in str(exc) for m in _FATAL_MESSAGES)


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """`Type: message (at file:line in function)`, where the innermost frame raised it."""
    message = " ".join(str(exc).split())
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return (text[: max(0, limit - len(at))] + at) if len(text) + len(at) > limit else text + at


def log_failure(log, subject_id: str, exc: BaseException) -> None:
    """One line for a user's mistake (a bad image, a missing file); the traceback as well for
    anything else, where it is what a bug report needs."""
    from launcher.errors import UserError

    if isinstance(exc, UserError):
        log.error("subject %s failed: %s", subject_id, exc)
    else:
        log.error("subject %s failed: %s", subject_id, one_line(exc), exc_info=exc)
