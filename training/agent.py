"""The per-node agent: torchrun, started so that SIGTERM stops it at any time.

    python -m training.agent --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d ... -m training.worker --job JOB

torchrun installs its signal handlers only when it starts the workers. Until then, while it
waits in the rendezvous for the other nodes, SIGTERM is left to the default action, which the
kernel does not take for a PID namespace's pid 1: in a container without an init (podman or
docker on Slurm, a Kubernetes pod) a job cancelled during the rendezvous leaves the agent, and
the container, running. Here SIGTERM exits (143) from the first instruction; torchrun's own
handlers take over once the workers start, and pass the signal on to them.
"""

from __future__ import annotations

import signal
import sys


def _exit_on_signal(signum: int, _frame) -> None:
    print(f"dreamfleet agent: {signal.Signals(signum).name} before the workers started; exiting", file=sys.stderr)
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()
