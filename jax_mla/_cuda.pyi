def registrations() -> dict[str, object]:
    """FFI handler capsules by target name, for platform "CUDA"."""

def capabilities() -> dict[str, object]:
    """What this build supports: "dtypes", "attention_head_dims" ([Dk, Dv] pairs),
    "attention_bwd_head_dims" (the pairs of the native backward),
    "attention_bwd_sm90_head_dims" (those its sm90 family takes, sm_90a),
    "attention_formats" (name -> FFI code: the formats flash_attention's k and
    v may both be in, contiguous) and "attention_quant_head_dims" (the pairs it
    takes over them), "mla_layouts" ([Dk, dv, v_offset]), "mla_formats" (name -> FFI code), and the
    kernel families a call may force, "mla_kernels" and "attention_kernels"
    (JAX_MLA_CUDA_MLA_KERNEL, JAX_MLA_CUDA_ATTENTION_KERNEL, which also picks the
    attention backward's family; "auto" first), the
    ops with kernels over paged caches, "paged_ops", and the page sizes of the
    *_paged targets, "page_sizes"."""

def sm_count(device: int = 0) -> int:
    """Multiprocessors of a CUDA device, 0 when there is none."""

def runtime_version() -> int:
    """The CUDA runtime version the module was built against (e.g. 13000)."""

def kv_tile(dk: int) -> int:
    """Keys per KV tile of the kernel for head dim dk; num_splits is clamped to the tiles."""

def work_items(batch: int, seq_q: int, heads_q: int, heads_kv: int, dk: int) -> int:
    """Thread blocks a call makes without split-KV (flash_mla: dk = 576, heads_kv = 1)."""

def mla_blocks_per_sm(rows: int, kv_fmt: int) -> int:
    """flash_mla thread blocks that run at once on one SM (rows = Sq * H; kv_fmt 0 float,
    1 q8_0, 2 q8_kv, 4 fp8_e4m3): the split heuristic fills that many per SM."""
