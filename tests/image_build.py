"""The worker image the container tests run, built in the background from the start of the session.

On a fresh machine the build takes about five minutes, most of it downloads and disk (debootstrap,
the torch wheel, pip inside `podman build`), not CPU. conftest starts it as its own process when
the collected tests include one that needs the image, so it overlaps the CPU-bound tests before
them; the `image` fixture (tests/test_container.py) waits for it. A session that ends first stops
it (the next session's podman layer cache keeps what it finished).

    .venv/bin/python tests/image_build.py WORKDIR      # the build alone, as the fixture runs it
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/dreamfleet:test"
BASE = "localhost/dreamfleet-base:bookworm"
TORCH = "torch==2.13.0"  # the CPU wheel the image installs from /wheels (docker/README.md)
# This machine's podman works only with runc (crun refuses the hybrid cgroup setup) and with
# lowered ulimits (the defaults cannot be set).
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

_running: tuple[subprocess.Popen, Path] | None = None


def build(workdir: Path) -> str:
    """Build the base and the image; returns a line with the times and the size. Raises on failure."""
    started = time.time()
    subprocess.run(["bash", str(REPO / "docker" / "build-test-base.sh"), BASE], check=True, timeout=900)
    base_s = time.time() - started
    wheels = workdir / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", TORCH, "-d", str(wheels)], check=True,
                   timeout=600)
    ca = Path("/etc/ssl/certs/ca-certificates.crt")  # this machine's bundle knows its network's TLS proxy
    cert = ["-v", f"{ca}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"] if ca.exists() else []
    subprocess.run([*PODMAN, "build", *LIMITS, "--network=host", "-v", f"{wheels}:/wheels:ro", *cert,
                    "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", "REVISION=test",
                    "-f", str(REPO / "docker" / "Dockerfile"), "-t", IMAGE, str(REPO)], check=True, timeout=1800)
    size = subprocess.run(["podman", "image", "inspect", IMAGE, "--format", "{{.Size}}"], capture_output=True,
                          text=True, check=True)
    return (f"image {IMAGE}: base {base_s:.0f}s, built in {time.time() - started:.0f}s in all, "
            f"{int(size.stdout.strip()) / 1e9:.2f} GB")


def start() -> None:
    """Start the build in its own process (once); its output goes to a log the fixture shows on failure."""
    global _running
    if _running is None:
        workdir = Path(tempfile.mkdtemp(prefix="dreamfleet-image-"))
        log = workdir / "build.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, __file__, str(workdir)], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _running = (proc, log)


def wait(timeout: float = 2400) -> tuple[bool, str]:
    """(built, the summary line or the end of the build's log): starts the build if nothing did."""
    start()
    proc, log = _running
    proc.wait(timeout)
    text = log.read_text(errors="replace")
    return proc.returncode == 0, text.strip().splitlines()[-1] if proc.returncode == 0 else text[-6000:]


def stop() -> None:
    """End a build still running when the session ends (its process group: podman, pip,
    debootstrap), and remove the downloaded wheel (the log stays)."""
    if _running is None:
        return
    proc, log = _running
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(log.parent / "wheels", ignore_errors=True)


if __name__ == "__main__":
    print(build(Path(sys.argv[1])), flush=True)
