"""The CUDA kernel family a call runs: the int32 `kernel` attribute of the CUDA
FFI calls (0 = auto, else an index into the module's capabilities()
"mla_kernels" / "attention_kernels"), from JAX_MLA_CUDA_MLA_KERNEL /
JAX_MLA_CUDA_ATTENTION_KERNEL read when the call is traced, so one process
(a test, a benchmark) can run every kernel on one card. The attention
backward (jax_mla_flash_attention_bwd) takes flash_attention's attribute and
names. The CPU calls take no such attribute."""

from __future__ import annotations

import os

import numpy as np

from jax_mla import _ffi

# op -> (environment variable, capabilities() key)
_SWITCHES = {
    "flash_mla": ("JAX_MLA_CUDA_MLA_KERNEL", "mla_kernels"),
    "flash_attention": ("JAX_MLA_CUDA_ATTENTION_KERNEL", "attention_kernels"),
}


def cuda_kernel_attr(op: str) -> np.int32:
    """The `kernel` attribute (C++ int32_t) of a CUDA call of `op` ("flash_mla"
    or "flash_attention"): the family its environment variable names, "auto"
    when it is unset or empty. ValueError for a name the module does not list."""
    if op not in _SWITCHES:
        raise ValueError(f"op must be one of {sorted(_SWITCHES)}, got {op!r}")
    variable, key = _SWITCHES[op]
    module = _ffi.module("gpu")
    if module is None:
        raise RuntimeError(f"{op}: the CUDA module is not loaded ({_ffi.why_missing('gpu', op)})")
    names = list(module.capabilities()[key])
    value = os.environ.get(variable) or "auto"
    if value not in names:
        raise ValueError(f"{variable} must be one of {names}, got {value!r}")
    return np.int32(names.index(value))
