def registrations() -> dict[str, object]:
    """FFI handler capsules by target name, for platform "cpu"."""

def kv_tile() -> int:
    """Keys per kernel tile; num_splits is clamped to the number of tiles."""

def isa() -> str:
    """The ISA path the kernels take now (JAX_MLA_CPU_ISA or the best available)."""

def built_isas() -> str:
    """Comma-separated ISA levels compiled into this build, best first."""

def supported_isas() -> str:
    """Comma-separated ISA levels of this build that this CPU can run."""
