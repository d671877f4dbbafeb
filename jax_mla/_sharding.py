"""How a native call partitions over a device mesh (docs/design.md,
"Transformations"): its Shardy sharding rule, the GSPMD callbacks, and the per-device
call, context-parallel merge included.

A native call takes (q, *caches, q_pos, kv_len) and returns (out, lse):
q [B, Sq, H, Dk]; each cache [B, Skv, Hkv, X] (flash_attention),
[B, Skv, X] (flash_mla) or the float cache's empty scales placeholder;
q_pos and kv_len [B]; out [B, Sq, H, Dv]; lse [B, H, Sq]. Mesh axes on
  B      split the batch: each device attends its own rows;
  H      split the query heads: flash_attention's KV heads split with them
         (or, with fewer KV heads than devices, each device slices the one
         its query heads read), flash_mla's latent cache is replicated;
  Sq     split the queries: each device attends its rows at their positions;
  Skv    split the cache (context parallelism): each device attends its own
         keys at their global positions and the partial results are merged
         by LSE with one all-reduce of O(B * Sq * H * Dv) values.
None of these moves a cache. Head-dim axes (Dk, Dv, a quantized cache's
bytes and scales) are never split: an operand sharded there is gathered.

The backward call (q, k, v, dout, lse, delta, q_pos, kv_len) -> (dq, dk, dv)
splits by the same plan: dq like q, dk and dv like their caches. A key's
gradient sums over queries and query heads, a query's over keys, so where the
forward needs no communication the backward may need one all-reduce: dk and
dv over a query axis or over a head axis the caches are replicated along
(their size), dq over a context axis (its size). Still no cache moves.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import (
    ArrayMapping,
    SdyShardingRule,
    custom_partitioning,
)
from jax.sharding import NamedSharding, PartitionSpec

from jax_mla import _backend
from jax_mla.merge import merge_attention

# A native call: (q, *caches, q_pos, kv_len) -> (out, lse).
Native = Callable[..., tuple[jax.Array, jax.Array]]
# The native backward: (q, k, v, dout, lse, delta, q_pos, kv_len) -> (dq, dk, dv).
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
# num_splits for per-device shapes: (batch, seq_q, heads_q, heads_kv, seq_kv, dk, platform).
Resplit = Callable[[int, int, int, int, int, int, str], int]
Axes = tuple[str, ...]


def partitioned(op: str, ffi: Callable[[int], Native], num_splits: int, resplit: Resplit) -> Native:
    """The native call `ffi(num_splits)`, with rules that split it over a mesh.
    On one device (and inside shard_map, where the call already sees its
    shard) it is that call unchanged; split over a mesh, each device calls
    `ffi` with the number of KV splits `resplit` chooses for its shapes."""

    def plan(mesh, arg_shapes) -> _Plan:
        return _plan(mesh, arg_shapes[0], arg_shapes[1:-2])

    def layout(mesh, plan: _Plan):
        return plan.args(mesh), plan.results(mesh)

    def per_device(mesh, plan: _Plan) -> Native:
        return _per_device(ffi, resplit, mesh, plan)

    return _partitioned(op, ffi(num_splits), _rule, plan, layout, per_device)


def partitioned_backward(op: str, ffi: Backward) -> Backward:
    """The native backward call `ffi` (q, k, v, dout, lse, delta, q_pos,
    kv_len) -> (dq, dk, dv), with rules that split it over a mesh as the
    forward is split (module doc)."""

    def plan(mesh, arg_shapes) -> _Plan:
        return _plan(mesh, arg_shapes[0], arg_shapes[1:3], backward=True)

    def layout(mesh, plan: _Plan):
        q, rows, caches = plan.q_spec(), plan.rows_spec(), plan.cache_specs()
        args = (q, *caches, q, rows, rows, (plan.batch,), (plan.batch,))
        return tuple(_named(mesh, a) for a in args), tuple(_named(mesh, r) for r in (q, *caches))

    def per_device(mesh, plan: _Plan) -> Backward:
        return _per_device_backward(ffi, mesh, plan)

    return _partitioned(op, ffi, _rule_backward, plan, layout, per_device)


def _partitioned(
    op: str,
    call: Callable,
    rule: Callable[..., SdyShardingRule],
    plan: Callable[..., _Plan],
    layout: Callable[..., tuple[tuple[NamedSharding, ...], tuple[NamedSharding, ...]]],
    per_device: Callable[..., Callable],
) -> Callable:
    """`call` as a custom_partitioning: Shardy's `rule`, and the callbacks
    that read the operands' shardings into plan(mesh, arg_shapes), place the
    operands and results by layout(mesh, plan) -> (args, results) shardings,
    and run per_device(mesh, plan) on each device."""

    @custom_partitioning
    def partitioned_call(*args):
        return call(*args)

    def run(*args):
        _check_context(op)
        return partitioned_call(*args)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        p = plan(mesh, arg_shapes)
        args, results = layout(mesh, p)
        return mesh, per_device(mesh, p), results, args

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        del result_shape
        return layout(mesh, plan(mesh, arg_shapes))[1]

    partitioned_call.def_partition(
        partition=partition,
        decode_shardings=False,  # _dims reads the shardings, sub-axes included
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=rule,
    )
    return run


def _check_context(op: str) -> None:
    """A shard_map that leaves some mesh axes automatic (axis_names) hands the
    partitioner no mesh to split the call over: refuse it at trace time."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes:
        return
    auto = [a for a in (*mesh.auto_axes, *mesh.explicit_axes) if mesh.shape[a] > 1]
    if auto:
        raise NotImplementedError(
            f"{op}: inside a shard_map whose mesh axes {auto} are not manual; make every "
            "axis manual (shard_map's default axis_names) or call the op outside shard_map"
        )


def _rule(mesh, value_types, result_types) -> SdyShardingRule:
    """The Shardy rule: which dims of the operands and results are one factor.
    Skv ("t") appears in the caches only: sharding it is handled by the
    per-device call (offsets and the LSE merge), not by a reduction."""
    del mesh, result_types
    shapes = [tuple(t.shape) for t in value_types]
    q, caches = shapes[0], shapes[1:-2]
    lead = next(c for c in caches if len(c) > 1)
    same_batch = lead[0] == q[0]
    cache_batch = "b" if same_batch else "c"
    q_heads, kv_heads = "h", _kv_head_factor(q, lead)
    operands = [ArrayMapping("b", "s", q_heads, "d")]
    features = []
    for i, c in enumerate(caches):
        features.append(f"f{i}")
        if len(c) == 1:  # a float cache's empty scales placeholder
            operands.append(ArrayMapping(f"f{i}"))
        elif len(c) == 4:
            operands.append(ArrayMapping(cache_batch, "t", kv_heads, f"f{i}"))
        else:
            operands.append(ArrayMapping(cache_batch, "t", f"f{i}"))
    operands += [ArrayMapping("b"), ArrayMapping("b")]
    results = (ArrayMapping("b", "s", q_heads, "v"), ArrayMapping("b", q_heads, "s"))
    # Under vmap a shared cache has fewer rows than q (row b reads cache row
    # b % rows): that mapping holds only unsplit.
    replicated = {"d", "v", *features} | (set() if same_batch else {"b", "c"})
    # Shardy wants the special factors in the order they first appear.
    order = []
    for mapping in (*operands, *results):
        order += [factor for factor in mapping if factor not in order]
    return SdyShardingRule(
        tuple(operands),
        results,
        need_replication_factors=tuple(f for f in order if f in replicated),
    )


def _kv_head_factor(q: tuple[int, ...], cache: tuple[int, ...]) -> str:
    """GQA's KV heads are a factor of their own: as the compound (KV head,
    group) of the query heads, Shardy would split a KV head axis smaller than
    a mesh axis by a sub-axis, which the partition callback cannot be given.
    The callback splits the KV heads with the query heads instead."""
    return "h" if len(cache) < 4 or cache[2] == q[2] else "k"


def _rule_backward(mesh, value_types, result_types) -> SdyShardingRule:
    """The backward's Shardy rule: the forward's factors, dq like q, dk and
    dv like k and v. The sums this leaves (dk and dv over s and over h where
    the caches have no h, dq over t) are the per-device call's all-reduces."""
    del mesh, result_types
    q, k = (tuple(t.shape) for t in value_types[:2])
    kv_heads = _kv_head_factor(q, k)
    queries, rows = ArrayMapping("b", "s", "h", "d"), ArrayMapping("b", "h", "s")
    keys, values = ArrayMapping("b", "t", kv_heads, "d"), ArrayMapping("b", "t", kv_heads, "v")
    operands = (queries, keys, values, ArrayMapping("b", "s", "h", "v"), rows, rows)
    return SdyShardingRule(
        operands + (ArrayMapping("b"), ArrayMapping("b")),
        (queries, keys, values),
        need_replication_factors=("d", "v"),
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The mesh axes each logical dim is split over, () for none."""

    batch: Axes = ()
    seq_q: Axes = ()
    heads: Axes = ()
    seq_kv: Axes = ()
    kv_heads: Axes = ()  # flash_attention's KV heads: `heads`, or () when replicated
    cache_ranks: tuple[int, ...] = ()
    same_batch: bool = True

    def q_spec(self) -> tuple[Axes, ...]:
        """[B, Sq, H, D]: q, out, dout, dq."""
        return (self.batch, self.seq_q, self.heads, ())

    def rows_spec(self) -> tuple[Axes, ...]:
        """[B, H, Sq]: the LSE, delta."""
        return (self.batch, self.heads, self.seq_q)

    def cache_specs(self) -> list[tuple[Axes, ...]]:
        """Each cache (and, in the backward, its gradient)."""
        cache_batch = self.batch if self.same_batch else ()
        specs = []
        for rank in self.cache_ranks:
            if rank == 4:
                specs.append((cache_batch, self.seq_kv, self.kv_heads, ()))
            elif rank == 3:
                specs.append((cache_batch, self.seq_kv, ()))
            else:
                specs.append(((),) * rank)
        return specs

    def args(self, mesh) -> tuple[NamedSharding, ...]:
        rows = _named(mesh, (self.batch,))
        caches = [_named(mesh, spec) for spec in self.cache_specs()]
        return (_named(mesh, self.q_spec()), *caches, rows, rows)

    def results(self, mesh) -> tuple[NamedSharding, NamedSharding]:
        return _named(mesh, self.q_spec()), _named(mesh, self.rows_spec())


def _named(mesh, dims: Sequence[Axes]) -> NamedSharding:
    entries = [None if not a else a[0] if len(a) == 1 else a for a in dims]
    return NamedSharding(mesh, PartitionSpec(*entries))


def _dims(x, mesh) -> list[Axes]:
    """The mesh axes each dim of an operand is split over, major first, read
    from where its sharding puts each device's block. A dim split in a way no
    mesh axes name (a sub-axis, as XLA's propagation may leave behind: 2
    heads over a 4-device axis) counts as unsplit, and the partitioner then
    reshards it; JAX's own conversion to a PartitionSpec would fail there."""
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is None or mesh.empty:
        return [()] * len(shape)
    # On a shape padded to a multiple of the device count every split divides
    # (devices_indices_map refuses the uneven ones XLA pads), and the block
    # indices are the same.
    n = mesh.devices.size
    padded = tuple(-(-size // n) * n for size in shape)
    blocks = sharding.devices_indices_map(padded)
    coords = {device: c for c, device in np.ndenumerate(mesh.devices)}
    names = mesh.axis_names
    dims = []
    for i, size in enumerate(padded):
        starts = {d: blocks[d][i].indices(size)[0] for d in coords}
        step = min((v for v in starts.values() if v > 0), default=0)
        if not step:
            dims.append(())
            continue
        index = {d: v // step for d, v in starts.items()}
        found = ()
        for order in itertools.permutations(_moving_axes(index, coords)):
            if all(index[d] == _linear(c, order, mesh) for d, c in coords.items()):
                found = tuple(names[k] for k in order)
                break
        dims.append(found)
    return dims


def _moving_axes(index: dict, coords: dict) -> list[int]:
    """The mesh axes (by position) along which a dim's block index changes."""
    moving = []
    for k in range(len(next(iter(coords.values())))):
        seen: dict[tuple, int] = {}
        for d, c in coords.items():
            if seen.setdefault(c[:k] + c[k + 1 :], index[d]) != index[d]:
                moving.append(k)
                break
    return moving


def _linear(coord: tuple, order: Sequence[int], mesh) -> int:
    """The block index of the device at `coord` when the mesh axes `order`
    split a dim, the first the major one (a PartitionSpec's order)."""
    return functools.reduce(lambda acc, k: acc * mesh.devices.shape[k] + coord[k], order, 0)


def _size(mesh, axes: Axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _plan(mesh, q, caches: Sequence, *, backward: bool = False) -> _Plan:
    """Which mesh axes split which dim, from the shardings of q and the
    caches. The cache decides first (it is the operand that must never
    move), then q; an axis already taken, or a split the call cannot use, is
    dropped and the partitioner reshards that operand (slicing a replicated
    q, or gathering a dim that cannot be split)."""
    ranks = tuple(len(c.shape) for c in caches)
    lead = next(c for c in caches if len(c.shape) > 1)
    q_dims, c_dims = _dims(q, mesh), _dims(lead, mesh)
    same_batch = lead.shape[0] == q.shape[0]
    used: set[str] = set()

    def take(*candidates: Axes) -> Axes:
        for axes in candidates:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if axes and not used.intersection(axes):
                used.update(axes)
                return axes
        return ()

    batch = take(c_dims[0], q_dims[0]) if same_batch else ()
    seq_kv = take(c_dims[1])
    heads = kv_heads = ()
    if len(lead.shape) == 4:
        heads_q, heads_kv = q.shape[2], lead.shape[2]
        for axes in (c_dims[2], q_dims[2]):
            n = _size(mesh, axes)
            if axes and heads_q % n == 0 and (heads_kv % n == 0 or n % heads_kv == 0):
                heads = take(axes)
                if heads:
                    kv_heads = heads if heads_kv % n == 0 else ()
                    break
    else:
        heads = take(q_dims[2])
    seq_q = take(q_dims[1])
    if backward:
        # dk and dv sum over the queries, and over the query heads of a
        # replicated cache: the rows XLA pads an uneven split with would add
        # in, so such a split is gathered (q-sized operands) instead.
        if q.shape[1] % _size(mesh, seq_q):
            seq_q = ()
        if not kv_heads and q.shape[2] % _size(mesh, heads):
            heads = ()
    return _Plan(batch, seq_q, heads, seq_kv, kv_heads, ranks, same_batch)


def _per_device(ffi: Callable[[int], Native], resplit: Resplit, mesh, plan: _Plan) -> Native:
    """The call each device makes on its shard under `plan`."""
    platform = mesh.devices.flat[0].platform

    def call(q, *args):
        *caches, q_pos, kv_len = args
        batch, seq_q, heads, dk = q.shape
        lead = next(c for c in caches if c.ndim > 1)
        seq_kv = lead.shape[1]
        heads_kv = lead.shape[2] if lead.ndim == 4 else 1
        q_pos, kv_len = _local_positions(mesh, plan, q_pos, kv_len, seq_q, seq_kv)
        out_dtype = q.dtype
        if plan.seq_kv and not _backend.is_gpu(platform):
            # The partial outputs are merged in float32, as the kernel's own
            # split partials are; the CPU kernels take float32 queries over
            # any cache (the CUDA ones take one dtype).
            q = q.astype(jnp.float32)
        first = _kv_head(mesh, plan, heads, heads_kv)
        if first is not None:
            caches = [
                lax.dynamic_slice_in_dim(c, first, 1, 2) if c.ndim == 4 else c for c in caches
            ]
            heads_kv = 1
        num_splits = resplit(batch, seq_q, heads, heads_kv, seq_kv, dk, platform)
        out, lse = ffi(num_splits)(q, *caches, q_pos, kv_len)
        if plan.seq_kv:
            out, lse = merge_attention(out, lse, plan.seq_kv)
        return out.astype(out_dtype), lse

    return call


def _per_device_backward(ffi: Backward, mesh, plan: _Plan) -> Backward:
    """The backward call each device makes on its shard under `plan`: the
    forward's positions and KV head, then the sums over devices."""
    # Where the cache is replicated along the head axis, each device's dk and
    # dv cover its query heads only.
    kv_summed = plan.seq_q + (() if plan.kv_heads else plan.heads)

    def call(q, k, v, dout, lse, delta, q_pos, kv_len):
        seq_q, heads = q.shape[1], q.shape[2]
        seq_kv, heads_kv = k.shape[1], k.shape[2]
        # lse and delta are per query: the same on every device of a context
        # axis, so each device's P and dS are the global ones for its keys.
        q_pos, kv_len = _local_positions(mesh, plan, q_pos, kv_len, seq_q, seq_kv)
        first = _kv_head(mesh, plan, heads, heads_kv)
        if first is not None:
            k, v = (lax.dynamic_slice_in_dim(c, first, 1, 2) for c in (k, v))
        dq, dk, dv = ffi(q, k, v, dout, lse, delta, q_pos, kv_len)
        if first is not None:
            dk, dv = (
                lax.dynamic_update_slice_in_dim(
                    jnp.zeros(g.shape[:2] + (heads_kv,) + g.shape[3:], g.dtype), g, first, 2
                )
                for g in (dk, dv)
            )
        if kv_summed:
            dk, dv = lax.psum((dk, dv), kv_summed)
        if plan.seq_kv:
            dq = lax.psum(dq, plan.seq_kv)
        return dq, dk, dv

    return call


def _local_positions(mesh, plan: _Plan, q_pos, kv_len, seq_q: int, seq_kv: int):
    """q_pos and kv_len for this device's queries and keys (seq_q and seq_kv
    of them): a query split shifts q_pos by the device's first query, a
    context split both by its first key."""
    if plan.seq_q or plan.seq_kv:
        # Positions outside [-(Sq + 1), Skv] mean the same as these bounds
        # (no key, or every key): clamp so the offsets below cannot wrap.
        n_q, n_kv = _size(mesh, plan.seq_q), _size(mesh, plan.seq_kv)
        q_pos = jnp.clip(q_pos, -(seq_q * n_q) - 1, seq_kv * n_kv)
    if plan.seq_q:
        q_pos = q_pos + lax.axis_index(plan.seq_q) * seq_q
    if plan.seq_kv:
        # This device holds keys [offset, offset + seq_kv): key j is its row
        # j - offset, so both positions shift by the offset.
        offset = lax.axis_index(plan.seq_kv) * seq_kv
        q_pos = q_pos - offset
        kv_len = jnp.clip(kv_len - offset, 0, seq_kv)
    return q_pos, kv_len


def _kv_head(mesh, plan: _Plan, heads: int, heads_kv: int):
    """With fewer KV heads than devices along the head axis, this device's
    `heads` query heads all read one KV head of the replicated caches: its
    index (traced). None otherwise."""
    if not plan.heads or plan.kv_heads or heads_kv == 1:
        return None
    group = heads * _size(mesh, plan.heads) // heads_kv
    return lax.axis_index(plan.heads) * heads // group


def typed_like(q) -> tuple[NamedSharding | None, NamedSharding | None]:
    """The (out, lse) result types' shardings under a mesh of explicit axes
    (shardings in types): out and lse are split like q's B, Sq and H. None
    elsewhere (no mesh, auto axes, the dims split by nothing)."""
    sharding = getattr(jax.typeof(q), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None, None
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    batch, seq_q, heads, _ = spec
    if batch is None and seq_q is None and heads is None:
        return None, None
    return (
        NamedSharding(sharding.mesh, PartitionSpec(batch, seq_q, heads, None)),
        NamedSharding(sharding.mesh, PartitionSpec(batch, heads, seq_q)),
    )
