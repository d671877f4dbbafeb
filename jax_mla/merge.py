"""merge_attention: partial attention results over disjoint keys, held by the
devices of a named mesh axis, merged into the full attention by their
log-sum-exp (context parallelism)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_mla import _checks

_OP = "merge_attention"


def merge_attention(
    out: jax.Array, lse: jax.Array, axis_name: str | tuple[str, ...]
) -> tuple[jax.Array, jax.Array]:
    """Merges the partial attentions held along the mesh axis `axis_name`.

    Call it inside `jax.shard_map` (or any context where `axis_name` is
    bound) when each device along that axis attended the same queries to
    its own slice of the keys (flash_attention or flash_mla with
    return_lse=True, their q_pos and kv_len made relative to the slice; see
    docs/sharding.md). Every device gets the attention over all the keys:

      lse = log(sum_d exp(lse_d)),  out = sum_d exp(lse_d - lse) * out_d

    with one all-reduce of the weighted outputs, O(B * Sq * H * Dv) values
    (plus an all-reduce max of the LSEs), never the keys. A device whose
    slice holds no key visible to a query (out 0, lse -inf there) adds
    nothing; a query no device saw gets out 0 and lse -inf.

    Args:
      out: [B, Sq, H, Dv] float: this device's partial output.
      lse: [B, H, Sq] float32: its log-sum-exp (-inf where it saw no key).
      axis_name: the mesh axis (or tuple of axes) the keys are split over.

    Returns:
      (out [B, Sq, H, Dv] in out's dtype, lse [B, H, Sq] float32), the same
      on every device of the axis. The merge computes in float32; an out in
      float16 or bfloat16 is rounded once more than a single call's. It is
      differentiable (jax.grad through it reaches each device's out and lse).
    """
    _checks.check_float_array(_OP, "out", out, 4, "[B, Sq, H, Dv]")
    _checks.check_float_array(_OP, "lse", lse, 3, "[B, H, Sq]")
    batch, seq_q, heads, _ = out.shape
    if tuple(lse.shape) != (batch, heads, seq_q):
        raise ValueError(
            f"{_OP}: lse must have shape ({batch}, {heads}, {seq_q}) ([B, H, Sq] of out "
            f"{tuple(out.shape)}), got {tuple(lse.shape)}"
        )
    lse = lse.astype(jnp.float32)
    # The shift cancels out of both results, so it carries no gradient; stopped,
    # since pmax has no differentiation rule.
    top = lax.pmax(lax.stop_gradient(lse), axis_name)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # all -inf: every weight is 0
    weight = jnp.moveaxis(jnp.exp(lse - top), 1, 2)[..., None]  # [B, Sq, H, 1]
    # The weighted outputs and the weights travel in one all-reduce.
    total = lax.psum(jnp.concatenate([out.astype(jnp.float32) * weight, weight], -1), axis_name)
    num, den = total[..., :-1], total[..., -1:]
    seen = den > 0
    merged = jnp.where(seen, num / jnp.where(seen, den, 1.0), 0.0)
    den = jnp.moveaxis(den[..., 0], 2, 1)  # [B, H, Sq]
    merged_lse = jnp.where(den > 0, top + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return merged.astype(out.dtype), merged_lse
