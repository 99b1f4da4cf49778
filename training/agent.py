"""The per-node agent: torchrun, ending with the workers' own exit code.

    python -m training.agent --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d ... -m training.worker --job JOB

Schedulers act on the exit code that reaches them: the sbatch script requeues on 75, the
Kubernetes podFailurePolicy ignores 75 (a disruption) and fails the index on 2 (a user error).
torchrun itself ends with 1 and a 30-line ChildFailedError whatever its workers returned, so
this agent runs torchrun's launcher in-process and exits with

    75  if any worker checkpointed on request (EXIT_PREEMPTED),
    2   if any worker failed on user input (EXIT_USER_ERROR),
    the first failed worker's code otherwise (128 + N for a worker killed by signal N),

with one line per failed worker instead of torchrun's report.

Signals. torchrun turns SIGTERM into an exception that kills the workers and loses their codes.
Here torchrun handles only SIGHUP and SIGQUIT; SIGTERM and SIGINT are the agent's: once the
workers run, they are passed on to them (each checkpoints and exits 75, which torchrun then
reports like any exit), and before that, while the agent waits in the rendezvous, they end it at
once (128 + N). The default action does not apply to a PID namespace's pid 1, so a container
without an init (podman or docker on Slurm, a Kubernetes pod) needs the explicit exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from launcher.errors import EXIT_PREEMPTED, EXIT_USER_ERROR

# what torchrun still handles itself (its default list less TERM and INT, which are ours)
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"


def _children() -> list[int]:
    """This process's child processes (the workers, once torchrun has started them)."""
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:  # not Linux, or /proc not mounted: nothing to pass the signal to
        return []
    return pids


_asked = False


def _on_signal(signum: int, _frame) -> None:
    global _asked
    workers = _children()
    name = signal.Signals(signum).name
    if not workers:
        print(f"dreamfleet agent: {name} before the workers started; exiting", file=sys.stderr)
        raise SystemExit(128 + signum)
    # the first signal is a checkpoint request (SIGTERM to the workers); a later Ctrl-C means now
    forward = signal.SIGINT if _asked and signum == signal.SIGINT else signal.SIGTERM
    _asked = True
    print(f"dreamfleet agent: {name}: passing {forward.name} to {len(workers)} worker(s)", file=sys.stderr)
    for pid in workers:
        try:
            os.killpg(pid, forward)  # torchrun starts each worker as the leader of its own session
        except ProcessLookupError:
            pass


def shell_code(code: int) -> int:
    """A process's exit code as a shell reports it: Popen's -N (killed by signal N) is 128 + N."""
    return 128 - code if code < 0 else code


def exit_code(failures: dict[int, int]) -> int:
    """The agent's exit code from {global rank: worker exit code} of the failed workers, in the
    order they failed."""
    codes = [shell_code(code) for code in failures.values()]
    if not codes:
        return 0
    if EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    return codes[0] or 1


def _describe(code: int) -> str:
    if code == EXIT_PREEMPTED:
        return "checkpointed on request"
    if code == EXIT_USER_ERROR:
        return "stopped on a user error"
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            return "killed by a signal"
    return "failed"


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs each failure with the worker's traceback file; the lines below say it once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = parse_args(argv)
    args.signals_to_handle = TORCHRUN_SIGNALS  # torch >= 2.7 takes it from here, older ones from the environment
    try:
        run(args)
    except ChildFailedError as exc:
        ordered = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
        failures = {rank: shell_code(failure.exitcode) for rank, failure in ordered}
        code = exit_code(failures)
        for rank, worker_code in failures.items():
            print(f"dreamfleet agent: worker rank {rank} exited {worker_code} ({_describe(worker_code)}); its log is "
                  "above", file=sys.stderr)
        print(f"dreamfleet agent: exiting {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
