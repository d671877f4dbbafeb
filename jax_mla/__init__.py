"""jax_mla: DeepSeek-style attention (MLA over the latent cache, flash
attention with Dk != Dv, split-KV decoding) as native XLA FFI kernels for JAX."""

from jax_mla._ffi import backends
from jax_mla.attention import flash_attention
from jax_mla.merge import merge_attention
from jax_mla.mla import flash_mla
from jax_mla.paging import PageAllocator
from jax_mla.quant import QuantizedKV, cache_bytes, cache_update, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "PageAllocator",
    "QuantizedKV",
    "backends",
    "cache_bytes",
    "cache_update",
    "dequantize",
    "flash_attention",
    "flash_mla",
    "merge_attention",
    "quantize",
]
