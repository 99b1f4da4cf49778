"""Pure renderers: plan -> text (sbatch) or data (manifests). No I/O, no clock, no randomness:
the same job renders to the same bytes. Backends write and submit what these return."""
