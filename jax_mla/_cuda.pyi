def registrations() -> dict[str, object]:
    """FFI handler capsules by target name, for platform "CUDA"."""

def sm_count(device: int = 0) -> int:
    """Multiprocessors of a CUDA device, 0 when there is none."""

def runtime_version() -> int:
    """The CUDA runtime version the module was built against (e.g. 13000)."""

def kv_tile(dk: int) -> int:
    """Keys per KV tile of the kernel for head dim dk; num_splits is clamped to the tiles."""

def work_items(batch: int, seq_q: int, heads_q: int, heads_kv: int, dk: int) -> int:
    """Thread blocks a call makes without split-KV (flash_mla: dk = 576, heads_kv = 1)."""
