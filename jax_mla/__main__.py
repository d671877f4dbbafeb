"""`python -m jax_mla`: the benchmark (see jax_mla/bench/, or --help)."""

import sys

from jax_mla.bench import main

sys.exit(main())
