"""The benchmark behind `python -m jax_mla`: the native kernels against the
best plain-JAX formulation on DeepSeek attention shapes, on the default JAX
device, each row checked against jax_mla.reference before it is timed.

  cases      what is timed: Case, the CPU sweep, the GPU shapes, inputs
  timing     the one timer (also used by the peer comparisons in benchmarks/)
  baselines  the plain-JAX formulations (of the ops and of the DeepSeek layer)
  ops        op rows: check, then time, native and plain JAX on a case
  layer      layer rows: the DeepSeek-V2-Lite attention layer per mode, and plain JAX
  sharded    sharded rows (--sharded): each op split over every device JAX has
  report     header, tables and the JSON of --json
  cli        the command line
"""

from jax_mla.bench.cli import main

__all__ = ["main"]
