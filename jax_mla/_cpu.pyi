def registrations() -> dict[str, object]:
    """FFI handler capsules by target name, for platform "cpu"."""

def capabilities() -> dict[str, object]:
    """What the CPU kernels take: the head-dim rule (multiples of head_dim_multiple up to max_head_dim), the dtypes, the quantized formats and their FFI attribute codes, the KV tile, and the page sizes of the *_paged targets."""

def kv_tile() -> int:
    """Keys per kernel tile; num_splits is clamped to the number of tiles."""

def isa() -> str:
    """The ISA path the kernels take now (JAX_MLA_CPU_ISA or the best available)."""

def work_items(batch: int, seq_q: int, heads_q: int, heads_kv: int) -> int:
    """Work items the CPU driver makes of a call without split-KV (the num_splits heuristic splits the keys when there are fewer items than threads)."""

def built_isas() -> str:
    """Comma-separated ISA levels compiled into this build, best first."""

def supported_isas() -> str:
    """Comma-separated ISA levels of this build that this CPU can run."""
