"""How many KV chunks a native call is split into (split-KV decoding): the
CPU and GPU heuristics (pure functions, so testable), the device facts they
read (CPU threads, GPU SMs) and the split partials an FFI call declares."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jax_mla import _backend, _ffi


def num_splits_heuristic(items: int, seq_kv: int, *, kv_tile: int, workers: int) -> int:
    """How many KV chunks to split a call into (a pure function, so testable).

    `items` is how many work items the native driver makes of the call
    without splitting (the module's work_items(), so its plan is the only
    one). When they already give every worker something to do, splitting
    only adds the LSE merge. Otherwise split the keys so that there are about
    as many items as workers, keeping at least two KV tiles per chunk so each
    item stays GEMM-shaped.
    """
    tiles = -(-seq_kv // kv_tile)
    if tiles < 4 or items <= 0 or items >= workers:
        return 1
    return max(1, min(-(-workers // items), tiles // 2))


def cpu_workers() -> int:
    """Threads the CPU kernels can use: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_num_splits_heuristic(items: int, seq_kv: int, *, kv_tile: int, sms: int) -> int:
    """num_splits for a CUDA call (a pure function); 1 when the blocks already
    fill the GPU. First the wave count: that of the fewest splits that fill at
    least 90% of the last wave of thread blocks (`sms` blocks per wave), with
    at least two KV tiles per split. Then, within that many waves, the fewest
    splits that give each block the fewest tiles: a block of split s takes
    ceil(tiles / ns) tiles, so ns = 119 over 512 tiles runs 103 blocks of 5
    (and 16 empty ones) where 128 blocks of 4 take the same wave."""
    tiles = -(-seq_kv // kv_tile)
    if tiles < 4 or items <= 0 or sms <= 0 or items >= sms:
        return 1
    first, best_fill = 1, 0.0
    for ns in range(1, tiles // 2 + 1):
        blocks = items * ns
        fill = blocks / (-(-blocks // sms) * sms)
        if fill > best_fill:
            first, best_fill = ns, fill
        if fill >= 0.9:
            break
    waves = -(-items * first // sms)
    most = min(waves * sms // items, tiles // 2)  # splits that still fit those waves
    per = -(-tiles // most)  # the fewest tiles per block there
    return -(-tiles // per)


def choose_num_splits(
    num_splits,
    batch: int,
    seq_q: int,
    heads_q: int,
    heads_kv: int,
    seq_kv: int,
    *,
    platform: str = "cpu",
    dk: int = 0,
    blocks_per_sm: int = 1,
) -> int:
    """num_splits for a native call: the caller's value or the heuristic's,
    clamped to the number of KV tiles of the platform's kernel. On the GPU
    the heuristic fills `blocks_per_sm` thread blocks per SM (the kernel's
    occupancy, from the native module)."""
    if _backend.is_gpu(platform):
        module = _ffi.module("gpu")
        kv_tile = module.kv_tile(dk)
        if num_splits is None:
            items = module.work_items(batch, seq_q, heads_q, heads_kv, dk)
            num_splits = gpu_num_splits_heuristic(
                items, seq_kv, kv_tile=kv_tile, sms=_gpu_sm_count() * blocks_per_sm
            )
        return max(1, min(num_splits, -(-seq_kv // kv_tile)))
    module = _ffi.module("cpu")
    kv_tile = module.kv_tile()
    if num_splits is None:
        items = module.work_items(batch, seq_q, heads_q, heads_kv)
        num_splits = num_splits_heuristic(items, seq_kv, kv_tile=kv_tile, workers=cpu_workers())
    return max(1, min(num_splits, -(-seq_kv // kv_tile)))


_sm_counts: dict[int, int] = {}


def _gpu_sm_count(device: int = 0) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = _ffi.module("gpu").sm_count(device)
    return _sm_counts[device]


def split_partial_types(batch: int, num_splits: int, seq_q: int, heads: int, dv: int):
    """The split-KV partial results (out, lse) an FFI call declares. They are
    results rather than allocations in the handler; with one split the kernel
    writes the output directly and they are empty."""
    if num_splits == 1:
        shapes = ((0,), (0,))
    else:
        shapes = ((batch, num_splits, seq_q, heads, dv), (batch, num_splits, seq_q, heads))
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
