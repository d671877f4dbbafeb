"""Sharding: merge_attention against the unsplit call on one device (vmap
binds its axis name), its errors, and the 8-device cases of sharded_cases.py
run in a process of their own, since the device count is fixed when jax
starts and this one already started with one CPU device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla

from .conftest import assert_close, cache, randn
from .test_grad import assert_grad_close


def split_keys(q, kv, kv_len, parts: int, **kw):
    """flash_mla on each of `parts` slices of the cache, with q_pos and kv_len
    made relative to the slice: (out, lse) stacked over the parts."""
    rows = kv.shape[1] // parts
    q_pos = kv_len - q.shape[1]
    outs = [
        jax_mla.flash_mla(
            q,
            kv[:, i * rows : (i + 1) * rows],
            q_pos=q_pos - i * rows,
            kv_len=jnp.clip(kv_len - i * rows, 0, rows),
            return_lse=True,
            backend="native",
            **kw,
        )
        for i in range(parts)
    ]
    return tuple(jnp.stack(x) for x in zip(*outs))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_merge_attention_equals_the_unsplit_call(rng, dtype, causal):
    # Row 1 sees keys in the first parts only, row 2 none at all: parts with
    # no visible key (lse -inf) must add nothing, and an empty row stays empty.
    q = randn(rng, (3, 4, 2, 64), dtype)
    kv_len = jnp.asarray([200, 70, 0], jnp.int32)
    kv = cache(rng, (3, 200, 64), dtype, kv_len)
    out, lse = split_keys(q, kv, kv_len, 4, dv=48, causal=causal)
    got = jax.vmap(lambda o, s: jax_mla.merge_attention(o, s, "i"), axis_name="i")(out, lse)
    want = jax_mla.flash_mla(
        q, kv, dv=48, causal=causal, kv_len=kv_len, return_lse=True, backend="native"
    )
    for part_out, part_lse, want_x in zip(got[0], got[1], [want[0]] * 4):
        # float32 merge of float32 partials (the kernel's split merge is
        # float32 too); a bfloat16 out is rounded once more per part.
        assert_close(part_out, want_x, dtype, f32_tol=1e-5 if dtype == jnp.float32 else 2**-8)
        assert_close(part_lse, want[1], jnp.float32)
        assert part_out.dtype == dtype and part_lse.dtype == jnp.float32
    assert (np.asarray(got[0][:, 2]) == 0).all() and np.isneginf(np.asarray(got[1][:, 2])).all()


def test_merge_attention_gradient(rng):
    # jax.grad through the parts and their merge equals the unsplit call's
    # (the merge's max shift cancels, so it carries no gradient).
    q = randn(rng, (2, 3, 2, 64), jnp.float32)
    kv_len = jnp.asarray([160, 50], jnp.int32)
    kv = cache(rng, (2, 160, 64), jnp.float32, kv_len)
    merge = jax.vmap(lambda o, s: jax_mla.merge_attention(o, s, "i"), axis_name="i")

    def loss(out, lse):
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(lse))

    def split(q, kv):
        out, lse = merge(*split_keys(q, kv, kv_len, 4, dv=32, causal=True))
        return loss(out[1], lse[1])

    def unsplit(q, kv):
        return loss(
            *jax_mla.flash_mla(
                q, kv, dv=32, causal=True, kv_len=kv_len, return_lse=True, backend="native"
            )
        )

    got = jax.jit(jax.grad(split, (0, 1)))(q, kv)
    want = jax.jit(jax.grad(unsplit, (0, 1)))(q, kv)
    for g, w, name in zip(got, want, ["dq", "dkv"]):
        assert_grad_close(g, np.asarray(w, np.float64), jnp.float32, name)


def test_merge_attention_errors():
    out, lse = jnp.zeros((2, 3, 4, 8)), jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 3\).*got \(2, 3, 4\)"):
        jax_mla.merge_attention(out, jnp.zeros((2, 3, 4)), "i")
    with pytest.raises(ValueError, match="out must have rank 4"):
        jax_mla.merge_attention(out[0], lse, "i")
    with pytest.raises(TypeError, match="lse must be float32, float16 or bfloat16"):
        jax_mla.merge_attention(out, lse.astype(jnp.int32), "i")
    with pytest.raises(NameError, match="unbound axis name: i"):
        jax_mla.merge_attention(out, lse, "i")


def test_sharded_cases_on_8_cpu_devices():
    """tests/sharded_cases.py on 8 fake CPU devices: every case must pass."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PYTEST_ADDOPTS", None)  # CI's --junitxml is this run's, not the child's
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["tests/sharded_cases.py"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"tests/sharded_cases.py failed (exit {result.returncode}):\n"
        f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    )
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
