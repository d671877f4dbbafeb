"""Which backend runs a call: the platform it targets, and the native kernel
or the pure-JAX reference (docs/design.md, "Backends and errors"), with the
one-time warning when the reference stands in for a missing module."""

from __future__ import annotations

import warnings

import jax

from jax_mla import _ffi

BACKENDS = (None, "native", "reference")

_warned: set[tuple[str, str]] = set()  # (platform, target) already warned about


def target_platform(*arrays) -> str:
    """The platform the call will run on, as far as trace time can tell: the
    device of a concrete input, else the default device (jax.default_device),
    else JAX's default backend."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return next(iter(x.devices())).platform
    device = jax.config.jax_default_device
    if device is not None:
        return device if isinstance(device, str) else device.platform
    return jax.default_backend()


def is_gpu(platform: str) -> bool:
    return _ffi._platform_key(platform) == "gpu"


def resolve_backend(op: str, backend, target: str, platform: str) -> str:
    """'native' or 'reference' for this call on `platform`."""
    if backend not in BACKENDS:
        raise ValueError(
            f"{op}: backend must be one of None, 'native', 'reference', got {backend!r}"
        )
    if backend == "reference":
        return "reference"
    if _ffi.has_target(platform, target):
        return "native"
    why = _ffi.why_missing(platform, target)
    if _ffi.module(platform) is not None:
        # The module is built but lacks this kernel (quantized caches on CUDA,
        # say): a valid configuration it does not support yet, never a silent
        # fallback, whatever `backend` says.
        raise NotImplementedError(
            f"{op}: no native kernel on {platform} for this call: {why} "
            "(backend='reference' runs the pure-JAX reference)"
        )
    if backend == "native":
        raise RuntimeError(
            f"{op}: backend='native' but {why}. Build it with "
            "`pip install -Ccmake.define.JAX_MLA_CUDA=ON .` for CUDA, or reinstall jax_mla "
            "with a C++ compiler for the CPU module"
        )
    if (platform, target) not in _warned:
        _warned.add((platform, target))
        warnings.warn(
            f"{op}: using the pure-JAX reference on {platform} because {why}",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
