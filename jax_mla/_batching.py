"""The vmap rule the ops share: fold the vmapped axis into the batch axis."""

from __future__ import annotations

import jax.numpy as jnp


def fold_vmap_into_batch(call, axis_size: int, in_batched, args, caches=()):
    """Batching rule for ops whose every argument leads with B (args[0] is q):
    merge the vmap axis into B (index v * B + b), call, and split it back.

    Unbatched arguments are broadcast, except the caches (indices in
    `caches`): the kernels let a K/V batch that divides q's serve query batch
    b from cache row b % kv_batch, so an unbatched cache is passed as it is
    and never copied per vmapped example. A batched cache whose batch is
    already smaller than q's (shared by an inner vmap) is tiled up to q's
    batch first, since the modulo rule only holds for the outermost axis.
    """
    q_batch = args[0].shape[1] if in_batched[0] else args[0].shape[0]
    merged = []
    for i, (x, batched) in enumerate(zip(args, in_batched)):
        if i in caches and not batched:
            merged.append(x)
            continue
        if not batched:
            x = jnp.broadcast_to(x, (axis_size,) + x.shape)
        elif i in caches and x.shape[1] != q_batch:
            x = jnp.tile(x, (1, q_batch // x.shape[1]) + (1,) * (x.ndim - 2))
        merged.append(x.reshape((axis_size * x.shape[1],) + x.shape[2:]))
    outs = call(*merged)
    return tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)


def fold_vmap_paged(call, axis_size: int, in_batched, args, n_cache: int):
    """Batching rule for the paged calls, args (q, *pages, block_table, q_pos,
    kv_len) with n_cache page arrays [num_pages, page_size, ...]: the vmapped
    axis is merged into B for q, the block table and the positions (index
    v * B + b). Unbatched pages are shared as they are; batched ones are
    merged into the page axis (page p of example v becomes v * num_pages + p)
    and the block table offset to match, out-of-range entries kept out of
    range."""
    caches = range(1, 1 + n_cache)
    pages_batched = any(in_batched[i] for i in caches)
    merged = []
    for i, (x, batched) in enumerate(zip(args, in_batched)):
        if i in caches and not pages_batched:
            merged.append(x)
            continue
        if not batched:
            x = jnp.broadcast_to(x, (axis_size,) + x.shape)
        if i == 1 + n_cache and pages_batched:  # the block table
            num_pages = args[1].shape[1] if in_batched[1] else args[1].shape[0]
            offset = jnp.arange(axis_size, dtype=jnp.int32)[:, None, None] * num_pages
            x = jnp.where((x >= 0) & (x < num_pages), x + offset, -1)
        merged.append(x.reshape((axis_size * x.shape[1],) + x.shape[2:]))
    outs = call(*merged)
    return tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)
