"""dreamfleet's control plane: the job schema, planning, renderers and backends.

Nothing here imports torch at module level, so `launcher --help`, `validate` and `render`
stay fast. The worker that trains lives in `training/` and imports from here, never the
other way round.
"""

__version__ = "0.1.0"
