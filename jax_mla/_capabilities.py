"""What each native backend takes, as its module reports it (capabilities():
the one table that the checks, their messages and the tests' parametrization
read), and the checks that turn a valid configuration outside it into
NotImplementedError (docs/design.md, "Backends and errors").

The CUDA table is read only when a call targets the GPU, so CPU calls never
need the CUDA module. The *_problem functions take a table and return what a
configuration lacks (None when the kernel takes it): the checks raise with
it, and the tests filter their GPU cases with it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jax_mla import _backend, _ffi, quant

_ANY = "(backend='reference' takes any)"


def _table(platform: str) -> dict:
    module = _ffi.module(platform)
    if module is None:
        raise RuntimeError(_ffi.why_missing(platform, "capabilities"))
    return module.capabilities()


@functools.cache
def cpu() -> dict:
    """The CPU module's table: head_dim_multiple, max_head_dim, dtypes,
    formats (name -> FFI attribute code), kv_tile, page_sizes (those of the
    *_paged targets)."""
    return _table("cpu")


@functools.cache
def cuda() -> dict:
    """The CUDA module's table: dtypes, attention_head_dims ([Dk, Dv] pairs),
    attention_bwd_head_dims (the pairs of the native backward),
    attention_bwd_sm90_head_dims (those its sm90 family takes),
    attention_formats (name -> code: the formats flash_attention's k and v
    may both be in, contiguous; absent: none) and attention_quant_head_dims
    (the pairs it takes over them), mla_layouts ([Dk, dv, v_offset]),
    mla_formats (name -> code), mla_kernels, attention_kernels, page_sizes
    (those of the *_paged targets; absent: none)."""
    return _table("gpu")


def format_code(platform: str, fmt: str | None) -> int:
    """The FFI attribute code of a cache format on `platform` (0: a float cache)."""
    if fmt is None:
        return 0
    if _backend.is_gpu(platform):
        table = cuda()
        return {**table["mla_formats"], **table.get("attention_formats", {})}[fmt]
    return cpu()["formats"][fmt]


def cpu_head_dims_problem(table: dict, dims: dict[str, int]) -> str | None:
    multiple, largest = table["head_dim_multiple"], table["max_head_dim"]
    for name, d in dims.items():
        if d <= 0 or d % multiple or d > largest:
            return (
                f"the CPU kernel supports head dims that are multiples of {multiple} up to "
                f"{largest}; got {name} = {d} {_ANY}"
            )
    return None


def _cuda_dtypes_problem(table: dict, dtypes: dict[str, jnp.dtype]) -> str | None:
    """One of the table's dtypes for every input."""
    kinds = {jnp.dtype(d) for d in dtypes.values()}
    if len(kinds) != 1 or next(iter(kinds)).name not in table["dtypes"]:
        got = ", ".join(f"{name} {jnp.dtype(d)}" for name, d in dtypes.items())
        return (
            f"the CUDA kernel takes {', '.join(dtypes)} all "
            f"{' or all '.join(table['dtypes'])}; got {got} {_ANY}"
        )
    return None


def cuda_attention_problem(
    table: dict,
    dtypes: dict[str, jnp.dtype],
    dk: int,
    dv: int,
    k_fmt: str | None = None,
    v_fmt: str | None = None,
) -> str | None:
    """`dtypes`: q's and those of the float caches among k and v; `k_fmt`,
    `v_fmt`: a quantized cache's format (None for a float one)."""
    if k_fmt is None and v_fmt is None:
        pairs = tuple(tuple(p) for p in table["attention_head_dims"])
        problem = _cuda_dtypes_problem(table, dtypes)
        if problem is None and (dk, dv) not in pairs:
            problem = f"the CUDA kernel supports (Dk, Dv) in {pairs}; got {(dk, dv)} {_ANY}"
        return problem
    formats = tuple(table.get("attention_formats", ()))
    pairs = tuple(tuple(p) for p in table.get("attention_quant_head_dims", ()))
    if k_fmt not in formats or v_fmt not in formats:
        got = ", ".join(
            f"{name} {fmt or jnp.dtype(dtypes[name])}" for name, fmt in (("k", k_fmt), ("v", v_fmt))
        )
        takes = f"both in {' or '.join(formats)}" if formats else "in no quantized format"
        return (
            f"the CUDA kernel takes quantized k and v {takes} (each its own), or both "
            f"float; got {got} (backend='reference' and the CPU kernel take any)"
        )
    if jnp.dtype(dtypes["q"]).name not in table["dtypes"]:
        return (
            f"the CUDA kernel takes q {' or '.join(table['dtypes'])} over quantized "
            f"caches; got q {jnp.dtype(dtypes['q'])} {_ANY}"
        )
    if (dk, dv) not in pairs:
        return (
            f"the CUDA kernel supports (Dk, Dv) in {pairs} over quantized caches; got "
            f"{(dk, dv)} {_ANY}"
        )
    return None


def cuda_attention_bwd_problem(
    table: dict, dtypes: dict[str, jnp.dtype], dk: int, dv: int
) -> str | None:
    """What the CUDA backward kernel lacks for a call (None when it takes it):
    q, k, v and dout of one of the table's dtypes, (Dk, Dv) one of its
    backward pairs (a build without the backward lists none)."""
    pairs = tuple(tuple(p) for p in table.get("attention_bwd_head_dims", ()))
    problem = _cuda_dtypes_problem(table, dtypes)
    if problem is None and (dk, dv) not in pairs:
        problem = f"the CUDA backward kernel supports (Dk, Dv) in {pairs}; got {(dk, dv)}"
    return problem


def cuda_mla_problem(
    table: dict, dtypes: dict[str, jnp.dtype], fmt: str | None, dk: int, dv: int, v_offset: int
) -> str | None:
    """`dtypes`: q's and, for a float cache, kv's; `fmt`: a quantized cache's
    format (None for a float cache)."""
    if fmt is None:
        problem = _cuda_dtypes_problem(table, dtypes)
    elif fmt not in table["mla_formats"]:
        problem = (
            f"the CUDA kernel supports quantized caches in "
            f"{', '.join(table['mla_formats'])}; got {fmt} (backend='reference' takes "
            f"any, the CPU kernel takes {fmt})"
        )
    elif jnp.dtype(dtypes["q"]).name not in table["dtypes"]:
        problem = (
            f"the CUDA kernel takes q {' or '.join(table['dtypes'])} over a quantized "
            f"cache; got q {jnp.dtype(dtypes['q'])} {_ANY}"
        )
    else:
        problem = None
    layouts = tuple(tuple(t) for t in table["mla_layouts"])
    if problem is None and (dk, dv, v_offset) not in layouts:
        supported = f"= {layouts[0]}" if len(layouts) == 1 else f"in {layouts}"
        problem = (
            f"the CUDA kernel supports (Dk, dv, v_offset) {supported}; got "
            f"{(dk, dv, v_offset)} {_ANY}"
        )
    return problem


def _raise(op: str, problem: str | None) -> None:
    if problem is not None:
        raise NotImplementedError(f"{op}: {problem}")


def check_cpu_head_dims(op: str, **dims: int) -> None:
    _raise(op, cpu_head_dims_problem(cpu(), dims))


def page_size_problem(table: dict, page_size: int) -> str | None:
    """What a paged cache of `page_size` lacks in a module's table, whose
    "page_sizes" lists the page sizes its *_paged kernels take (none: no
    paged kernels)."""
    sizes = tuple(table.get("page_sizes", ()))
    if page_size in sizes:
        return None
    if not sizes:
        return f"this backend has no kernels over paged caches {_ANY}"
    return (
        f"the kernels over paged caches take page sizes {', '.join(map(str, sizes))}; "
        f"got {page_size} {_ANY}"
    )


def check_page_size(op: str, platform: str, page_size: int) -> None:
    table = cuda() if _backend.is_gpu(platform) else cpu()
    _raise(op, page_size_problem(table, page_size))


def check_cuda_attention(op: str, q, k, v) -> None:
    """k and v: float arrays or QuantizedKV (v's head dim is its logical one)."""
    fmts = {
        name: c.fmt if isinstance(c, quant.QuantizedKV) else None
        for name, c in (("k", k), ("v", v))
    }
    dtypes = {"q": q.dtype}
    dtypes.update((name, c.dtype) for name, c in (("k", k), ("v", v)) if fmts[name] is None)
    problem = cuda_attention_problem(cuda(), dtypes, q.shape[-1], v.shape[-1], fmts["k"], fmts["v"])
    _raise(op, problem)


def check_cuda_mla(op: str, q, kv, dv: int, v_offset: int) -> None:
    if isinstance(kv, quant.QuantizedKV):
        dtypes, fmt = dict(q=q.dtype), kv.fmt
    else:
        dtypes, fmt = dict(q=q.dtype, kv=kv.dtype), None
    _raise(op, cuda_mla_problem(cuda(), dtypes, fmt, q.shape[-1], dv, v_offset))
