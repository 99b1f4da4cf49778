"""Pure renderers: plan -> text (sbatch) or data (manifests). No I/O, no clock, no randomness:
the same job renders to the same bytes. Backends write and submit what these return."""

# The per-node agent every backend starts: torchrun behind a SIGTERM handler (training/agent.py),
# so that a job cancelled during the rendezvous stops even as a container's pid 1.
AGENT_MODULE = "training.agent"
