"""Whether the process that holds a claim is provably gone.

A claim and a running status record the holder's process: host name, boot id, PID namespace,
pid and the process's start time. A later worker on the same host, booted the same, in the same
PID namespace, can look the pid up: no such process, or another process under that pid (a start
time that differs), means the holder is gone, and its subject can be taken over at once instead
of after `output.stale_after_s`. Anything else (another host, another container, a reboot, no
/proc) proves nothing, and the heartbeat rule stands.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: the start time in clock ticks since boot."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # after the command name, which may hold spaces


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def current() -> dict:
    """This process, as a claim records it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": _pid_namespace(),
            "pid": pid, "start": _start_time(pid)}


def provably_gone(holder: dict | None) -> bool:
    """True only when `holder` ran here (same host, boot and PID namespace) and its process is
    no longer there."""
    if not holder or not isinstance(holder.get("pid"), int):
        return False
    here = current()
    if any(holder.get(key) is None or holder.get(key) != here[key] for key in ("host", "boot", "pidns")):
        return False
    if not Path("/proc/self/stat").exists():
        return False
    start = _start_time(holder["pid"])
    return start is None or (holder.get("start") is not None and start != holder["start"])
