"""Small flash_mla / flash_attention calls for compute-sanitizer (memcheck,
racecheck): every kernel variant the CUDA module lists in capabilities() (MLA
16- and 64-row blocks over float caches in each kernel family the card runs
and over each quantized format (8-bit, fp8_e4m3), each attention head-dim pair
and kernel family, split-KV and its combine, causal, ragged kv_len with empty
rows, flash_attention over each pair of 8-bit k and v formats with their
scales NaN past kv_len), the attention backward (jax_mla_flash_attention_bwd: each backward pair
and kernel family, GQA, causal, keys past kv_len, rows that see no key), and paged flash_mla and
flash_attention (every page size, float and quantized latent caches, pages in
a random order in a pool NaN wherever no live key is, block-table entries out
of range both past kv_len and below it: those keys skipped, never read), each
checked against the reference so a silent failure also shows.
The references run in float64 numpy on the host: XLA's own GEMM autotuning
under the sanitizer was slow and crashed it (seen on the H100, 2026-11-25).
Run: compute-sanitizer --tool memcheck python3 benchmarks/gpu/sanitize_cases.py [--quick]
[--paged-only | --backward]
(--quick: one case per kernel kind, bfloat16 only, for racecheck's slower run;
--paged-only: the paged cases alone, --backward: the backward's cases alone.
The paged cases run in bfloat16: the dtype changes no address arithmetic)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla


def ref_attention(q, k, v, scale, causal, q_pos, kv_len):
    """float64 numpy attention: q [B,Sq,Hq,Dk], k [B,Skv,Hkv,Dk], v [B,Skv,Hkv,Dv]."""
    q, k, v = (np.asarray(x, np.float32).astype(np.float64) for x in (q, k, v))
    B, Sq, Hq, _ = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = np.zeros((B, Sq, Hq, Dv))
    for b in range(B):
        for i in range(Sq):
            n = min(int(kv_len[b]), Skv)
            if causal:
                n = min(n, max(int(q_pos[b]) + i + 1, 0))
            if n == 0:
                continue
            for h in range(Hq):
                kh = h // (Hq // Hkv)
                s = k[b, :n, kh] @ q[b, i, h] * scale
                p = np.exp(s - s.max())
                out[b, i, h] = p @ v[b, :n, kh] / p.sum()
    return out


def ref_attention_bwd(q, k, v, dout, scale, causal, q_pos, kv_len):
    """float64 numpy backward of the attention above at cotangent dout (no
    LSE cotangent): (lse [B,Hq,Sq], delta [B,Hq,Sq], (dq, dk, dv))."""
    q, k, v, dout = (np.asarray(x, np.float32).astype(np.float64) for x in (q, k, v, dout))
    B, Sq, Hq, _ = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    lse = np.full((B, Hq, Sq), -np.inf)
    delta = np.zeros((B, Hq, Sq))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(B):
        for i in range(Sq):
            n = min(int(kv_len[b]), Skv)
            if causal:
                n = min(n, max(int(q_pos[b]) + i + 1, 0))
            if n == 0:
                continue
            for h in range(Hq):
                kh = h // group
                s = k[b, :n, kh] @ q[b, i, h] * scale
                lse[b, h, i] = s.max() + np.log(np.exp(s - s.max()).sum())
                p = np.exp(s - lse[b, h, i])
                delta[b, h, i] = dout[b, i, h] @ (p @ v[b, :n, kh])
                ds = p * (v[b, :n, kh] @ dout[b, i, h] - delta[b, h, i])
                dq[b, i, h] = scale * ds @ k[b, :n, kh]
                dk[b, :n, kh] += scale * np.outer(ds, q[b, i, h])
                dv[b, :n, kh] += np.outer(p, dout[b, i, h])
    return lse, delta, (dq, dk, dv)


def round_query_q8(q, scale):
    """The query as the kernels take it over 8-bit caches (quant_format.h,
    RoundQueryToQ8): q * scale, each block of 32 rounded with q8_0's rule."""
    x = np.asarray(q, np.float32) * np.float32(scale)
    xb = x.reshape(x.shape[:-1] + (-1, 32))
    d = np.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0))
    v = (xb * inv).astype(np.float64)
    return (d * (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.float32)).reshape(x.shape)


def quantized_reference(q, kvq, scale, dtype):
    """(query, rows, scale) the reference takes for a quantized cache as the
    kernels read it: over the 8-bit formats the scaled query rounded to 8 bits
    (scale 1) and the dequantized rows; over fp8_e4m3 the query as it is and
    the rows dequantized to the query's type (the kernel's K and V)."""
    if kvq.fmt == "fp8_e4m3":
        return q, np.asarray(jax_mla.dequantize(kvq, dtype), np.float32), scale
    return round_query_q8(q, scale), np.asarray(jax_mla.dequantize(kvq)), 1.0


def quantized_attention_cases(caps, rng, check, dtype, tol, quick):
    """flash_attention over 8-bit k and v (each pair of attention_formats, at
    attention_quant_head_dims): GQA, causal, decode and prefill, a batch row
    with no key and scales NaN past kv_len (never read), and an MHA decode
    the heuristic splits (the combine)."""
    formats = list(caps.get("attention_formats", {}))
    pairs = [(k, v) for k in formats for v in formats]
    dims = caps.get("attention_quant_head_dims", [])
    for k_fmt, v_fmt in pairs[:1] if quick else pairs:
        for dk, dv in dims:
            # (B, Sq, Hq, Hkv, Skv, kv_len)
            shapes = [(2, 70, 4, 2, 90, [90, 0]), (2, 1, 16, 16, 1000, [1000, 517])]
            if not quick:
                shapes.append((2, 1, 4, 2, 90, [77, 0]))
            for batch, seq_q, heads_q, heads_kv, seq_kv, kv_len in shapes:
                q = jnp.asarray(rng.standard_normal((batch, seq_q, heads_q, dk)), dtype)
                caches = []
                for fmt, d in ((k_fmt, dk), (v_fmt, dv)):
                    x = rng.standard_normal((batch, seq_kv, heads_kv, d)).astype(np.float32)
                    c = jax_mla.quantize(jnp.asarray(x), fmt)
                    scales = np.asarray(c.d).copy()
                    for b, n in enumerate(kv_len):
                        scales[b, n:] = np.nan
                    caches.append(jax_mla.QuantizedKV(c.qs, jnp.asarray(scales), fmt))
                got = jax_mla.flash_attention(
                    q,
                    *caches,
                    causal=True,
                    kv_len=jnp.asarray(kv_len, jnp.int32),
                    backend="native",
                )
                k, v = (np.asarray(jax_mla.dequantize(c)) for c in caches)
                want = ref_attention(
                    round_query_q8(q, dk**-0.5),
                    k,
                    v,
                    1.0,
                    True,
                    np.asarray(kv_len) - seq_q,
                    np.asarray(kv_len),
                )
                name = f"attention {k_fmt}/{v_fmt} {dtype.name} {dk}/{dv} Sq={seq_q} Hq={heads_q}"
                check(name, got, want, tol)


def paged_mla(target, q, cache, table, kv_len, kw):
    """(out, lse) of a paged flash_mla target, called directly (the kernels'
    reads are what memcheck watches): cache is (kv,) or (qs, d) as pages."""
    b, sq, h, _ = q.shape
    ns = int(kw["num_splits"])
    out_types = (
        jax.ShapeDtypeStruct((b, sq, h, kw["dv"]), q.dtype),
        jax.ShapeDtypeStruct((b, h, sq), jnp.float32),
        jax.ShapeDtypeStruct((b, ns, sq, h, kw["dv"]) if ns > 1 else (0,), jnp.float32),
        jax.ShapeDtypeStruct((b, ns, sq, h) if ns > 1 else (0,), jnp.float32),
    )
    call = jax.ffi.ffi_call(target, out_types)
    positions = (jnp.zeros((b,), jnp.int32), jnp.asarray(kv_len, jnp.int32))
    out, lse, _, _ = call(q, *cache, jnp.asarray(table), *positions, **kw)
    return jax.block_until_ready((out, lse))


def paged_cases(caps, rng, check, dtype, tol, quick):
    """Paged flash_mla: keys of batch row b on its pages in a random order of
    the pool, every slot no live key occupies NaN; table entries past kv_len
    and some below it out of range (skipped). Non-causal, so the reference is the
    attention over the live keys alone."""
    ((dk, dv, _),) = caps["mla_layouts"]
    page_sizes = caps["page_sizes"][::2] if quick else caps["page_sizes"]
    for page_size in page_sizes:
        max_pages = -(-160 // page_size)
        # The last row reaches the table's last entry: the entries read a tile
        # ahead must stop at kv_len, not run past the table.
        kv_len = np.array([150, 77, 0, max_pages * page_size], np.int32)
        batch, num_pages = len(kv_len), len(kv_len) * max_pages + 2
        table = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages)
        table = table.astype(np.int32)
        seq = np.arange(max_pages * page_size)
        for b, n in enumerate(kv_len):
            table[b, seq[::page_size] >= n] = -1 if b % 2 else num_pages + 7
        table[0, 1] = -5  # skipped below kv_len
        table[1, 0] = 2**31 - 1
        skipped = (table < 0) | (table >= num_pages)
        live = ~np.repeat(skipped, page_size, axis=1) & (seq[None, :] < kv_len[:, None])
        x = rng.standard_normal((num_pages, page_size, dk)).astype(np.float32)
        # NaN wherever no live key is: unused pages, skipped ones, rows past kv_len.
        poison = np.ones((num_pages, page_size), bool)
        for b in range(batch):
            pages = live[b].reshape(max_pages, page_size)
            for j in np.flatnonzero(~skipped[b]):
                poison[table[b, j]] &= ~pages[j]
        x[poison] = np.nan
        for heads, splits in (
            ((16, 3), (128, 2)) if quick else ((16, 1), (16, 3), (128, 1), (128, 2))
        ):
            q = jnp.asarray(rng.standard_normal((batch, 1, heads, dk)), dtype)
            kw = dict(
                scale=np.float32(dk**-0.5),
                causal=np.bool_(False),
                dv=np.int64(dv),
                v_offset=np.int64(0),
                num_splits=np.int64(splits),
            )
            for family in families(caps["mla_kernels"]) + list(caps["mla_formats"]):
                if family in caps["mla_formats"]:
                    kvq = jax_mla.quantize(jnp.asarray(np.nan_to_num(x)), family)
                    d = np.asarray(kvq.d).copy()
                    d[poison] = np.nan
                    cache = (kvq.qs, jnp.asarray(d))
                    target = "jax_mla_flash_mla_quant_paged"
                    q_ref, rows, scale = quantized_reference(q, kvq, dk**-0.5, dtype)
                    attrs = dict(kv_fmt=np.int64(caps["mla_formats"][family]), kernel=np.int32(0))
                else:
                    cache = (jnp.asarray(x, dtype),)
                    rows = np.asarray(cache[0], np.float32)
                    target, q_ref, scale = "jax_mla_flash_mla_paged", q, dk**-0.5
                    attrs = dict(kernel=np.int32(caps["mla_kernels"].index(family)))
                got, _ = paged_mla(target, q, cache, table, kv_len, {**kw, **attrs})
                kept = np.zeros((batch, max_pages * page_size, dk), np.float32)
                kept_len = live.sum(axis=1)
                for b in range(batch):
                    pages = rows[np.clip(table[b], 0, num_pages - 1)].reshape(-1, dk)
                    kept[b, : kept_len[b]] = pages[live[b]]
                want = ref_attention(
                    q_ref,
                    kept[:, :, None],
                    kept[:, :, None, :dv],
                    scale,
                    False,
                    np.zeros(batch),
                    kept_len,
                )
                name = f"paged mla {family} {dtype.name} page={page_size} H={heads} ns={splits}"
                check(name, got, want, tol)


def paged_attention_cases(caps, rng, check, dtype, tol, quick):
    """Paged flash_attention (mma.sync, split in two): k and v pages in a
    random order of a pool NaN wherever no live key is, GQA, one page below
    kv_len skipped; non-causal, so the reference is the attention over the
    live keys alone."""
    dims = caps["attention_head_dims"][:1] if quick else caps["attention_head_dims"]
    kv_len = np.array([90, 40, 0], np.int32)
    for page_size in caps["page_sizes"][::2] if quick else caps["page_sizes"]:
        max_pages = -(-96 // page_size)
        batch, num_pages = len(kv_len), len(kv_len) * max_pages + 1
        table = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages)
        table = table.astype(np.int32)
        seq = np.arange(max_pages * page_size)
        for b, n in enumerate(kv_len):
            table[b, seq[::page_size] >= n] = num_pages
        table[0, 0] = -1  # skipped below kv_len
        skipped = (table < 0) | (table >= num_pages)
        live = ~np.repeat(skipped, page_size, axis=1) & (seq[None, :] < kv_len[:, None])
        kept_len = live.sum(axis=1)
        for dk, dv in dims:
            q = jnp.asarray(rng.standard_normal((batch, 3, 4, dk)), dtype)
            pools = []
            for d in (dk, dv):
                x = rng.standard_normal((num_pages, page_size, 2, d)).astype(np.float32)
                poison = np.ones((num_pages, page_size), bool)
                for b in range(batch):
                    for j in np.flatnonzero(~skipped[b]):
                        poison[table[b, j]] &= ~live[b].reshape(max_pages, page_size)[j]
                x[poison] = np.nan
                pools.append(x)
            k, v = (jnp.asarray(x, dtype) for x in pools)
            out_types = (
                jax.ShapeDtypeStruct((batch, 3, 4, dv), dtype),
                jax.ShapeDtypeStruct((batch, 4, 3), jnp.float32),
                jax.ShapeDtypeStruct((batch, 2, 3, 4, dv), jnp.float32),
                jax.ShapeDtypeStruct((batch, 2, 3, 4), jnp.float32),
            )
            call = jax.ffi.ffi_call("jax_mla_flash_attention_paged", out_types)
            got = jax.block_until_ready(
                call(
                    q,
                    k,
                    v,
                    jnp.asarray(table),
                    jnp.zeros((batch,), jnp.int32),
                    jnp.asarray(kv_len),
                    scale=np.float32(dk**-0.5),
                    causal=np.bool_(False),
                    num_splits=np.int64(2),
                    kernel=np.int32(0),
                )
            )[0]
            kept = [np.zeros((batch, max_pages * page_size, 2, d), np.float32) for d in (dk, dv)]
            for arr, pool in zip(kept, (k, v)):
                rows = np.asarray(pool, np.float32)
                for b in range(batch):
                    pages = rows[np.clip(table[b], 0, num_pages - 1)]
                    arr[b, : kept_len[b]] = pages.reshape((-1,) + rows.shape[2:])[live[b]]
            want = ref_attention(q, kept[0], kept[1], dk**-0.5, False, np.zeros(batch), kept_len)
            check(f"paged attention {dtype.name} {dk}/{dv} page={page_size}", got, want, tol)


def families(names):
    """The kernel families of a capabilities() list this card runs: the sm90
    ones on compute capability 9.0 only."""
    hopper = getattr(jax.devices()[0], "compute_capability", "") == "9.0"
    return [n for n in names if hopper or not n.startswith("sm90")]


def backward_cases(caps, rng, dtype, quick, check):
    """The attention backward, called as the autodiff calls it, in each kernel
    family the card runs for the pair (mma_sync; sm90 on Hopper for its
    pairs): keys past kv_len hold NaN (never read), batch row 1 has no keys at
    all; Skv = 300 spans three of the sm90 KV kernel's 128-key blocks, Sq = 70
    parts of its 32-row steps and Q kernel's 128-row blocks."""
    tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    bwd_dims = caps.get("attention_bwd_head_dims", [])
    sm90_dims = [list(d) for d in caps.get("attention_bwd_sm90_head_dims", [])]
    names = list(caps["attention_kernels"])
    for dk, dv in bwd_dims[:1] if quick else bwd_dims:
        for family in families(["mma_sync", "sm90"]):
            if family == "sm90" and [dk, dv] not in sm90_dims:
                continue
            backward_family_cases(
                names.index(family), family, dk, dv, rng, dtype, tol, quick, check
            )


def backward_family_cases(kernel, family, dk, dv, rng, dtype, tol, quick, check):
    """backward_cases' calls of one pair, kernel family forced (`kernel`: its index)."""
    lengths = ((300, 261),) if quick else ((90, 77), (300, 261))
    for seq_q, causal in ((70, True),) if quick else ((1, False), (70, True), (70, False)):
        for seq_kv, n in lengths:
            kv_len = np.array([n, 0], np.int32)
            q, dout = (rng.standard_normal((2, seq_q, 4, d)) for d in (dk, dv))
            k, v = (rng.standard_normal((2, seq_kv, 2, d)) for d in (dk, dv))
            k[0, n:] = v[0, n:] = np.nan
            k[1], v[1] = np.nan, np.nan
            q, k, v, dout = (jnp.asarray(x, dtype) for x in (q, k, v, dout))
            q_pos = kv_len - seq_q
            lse, delta, want = ref_attention_bwd(q, k, v, dout, dk**-0.5, causal, q_pos, kv_len)
            call = jax.ffi.ffi_call(
                "jax_mla_flash_attention_bwd",
                tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
            )
            got = jax.block_until_ready(
                call(
                    q,
                    k,
                    v,
                    dout,
                    jnp.asarray(lse, jnp.float32),
                    jnp.asarray(delta, jnp.float32),
                    jnp.asarray(q_pos, jnp.int32),
                    jnp.asarray(kv_len, jnp.int32),
                    scale=np.float32(dk**-0.5),
                    causal=np.bool_(causal),
                    kernel=np.int32(kernel),
                )
            )
            for name, g, w in zip(("dq", "dk", "dv"), got, want):
                # Gradients grow with the rows summed: the tolerance is
                # relative to the largest.
                scaled = tol * max(1.0, float(np.abs(w).max()))
                check(
                    f"attention_bwd {family} {dtype.name} {dk}/{dv} Sq={seq_q} Skv={seq_kv} "
                    f"causal={causal} {name}",
                    g,
                    w,
                    scaled,
                )


def main():
    caps = jax_mla._ffi.module("gpu").capabilities()
    rng = np.random.default_rng(0)
    bad = 0

    def check(name, got, want, tol):
        nonlocal bad
        err = float(np.nanmax(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
        ok = err <= tol and not np.isnan(np.asarray(got, np.float32)).any()
        bad += not ok
        print(f"{name}: max|diff| {err:.3g} {'ok' if ok else 'FAIL'}", flush=True)

    quick = "--quick" in sys.argv
    paged_only = "--paged-only" in sys.argv
    dtypes = [jnp.dtype(d) for d in caps["dtypes"]]
    if "--backward" in sys.argv:  # the backward's cases only
        for dtype in dtypes[-1:] if quick else dtypes:
            backward_cases(caps, rng, dtype, quick, check)
        print("sanitize cases:", "all ok" if bad == 0 else f"{bad} FAILED", flush=True)
        return
    ((dk_mla, dv_mla, _),) = caps["mla_layouts"]
    for dtype in [] if paged_only else dtypes[-1:] if quick else dtypes:
        tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
        mla_cases = (
            ((16, 1, 3), (128, 1, 2))
            if quick
            else ((16, 1, 1), (16, 1, 3), (128, 2, 1), (20, 3, 2))
        )
        for family in families(caps["mla_kernels"]):
            os.environ["JAX_MLA_CUDA_MLA_KERNEL"] = family  # read when the call is traced
            for heads, seq_q, splits in mla_cases:
                q = jnp.asarray(rng.standard_normal((2, seq_q, heads, dk_mla)), dtype)
                kv = jnp.asarray(rng.standard_normal((2, 100, dk_mla)), dtype)
                kv_len = jnp.array([100, 37], jnp.int32)
                got = jax_mla.flash_mla(
                    q,
                    kv,
                    dv=dv_mla,
                    causal=True,
                    kv_len=kv_len,
                    num_splits=splits,
                    backend="native",
                )
                want = ref_attention(
                    q,
                    kv[:, :, None],
                    kv[:, :, None, :dv_mla],
                    dk_mla**-0.5,
                    True,
                    np.asarray(kv_len) - seq_q,
                    np.asarray(kv_len),
                )
                check(f"mla {family} {dtype.name} H={heads} Sq={seq_q} ns={splits}", got, want, tol)
        os.environ.pop("JAX_MLA_CUDA_MLA_KERNEL")
        # Quantized latent caches: 16-row and 64-row blocks, splits.
        for fmt in caps["mla_formats"]:
            for heads, seq_q, splits in ((16, 1, 3), (128, 1, 2)) if quick else mla_cases:
                q = jnp.asarray(rng.standard_normal((2, seq_q, heads, dk_mla)), dtype)
                kvq = jax_mla.quantize(
                    jnp.asarray(rng.standard_normal((2, 100, dk_mla)), jnp.float32), fmt
                )
                q_ref, kv, scale = quantized_reference(q, kvq, dk_mla**-0.5, dtype)
                kv_len = jnp.array([100, 37], jnp.int32)
                got = jax_mla.flash_mla(
                    q,
                    kvq,
                    dv=dv_mla,
                    causal=True,
                    kv_len=kv_len,
                    num_splits=splits,
                    backend="native",
                )
                want = ref_attention(
                    q_ref,
                    kv[:, :, None],
                    kv[:, :, None, :dv_mla],
                    scale,
                    True,
                    np.asarray(kv_len) - seq_q,
                    np.asarray(kv_len),
                )
                check(f"mla {fmt} {dtype.name} H={heads} Sq={seq_q} ns={splits}", got, want, tol)
        dims = caps["attention_head_dims"][:1] if quick else caps["attention_head_dims"]
        for family in families(caps["attention_kernels"]):
            os.environ["JAX_MLA_CUDA_ATTENTION_KERNEL"] = family
            for dk, dv in dims:
                for seq_q in (70,) if quick else (1, 70):
                    q = jnp.asarray(rng.standard_normal((2, seq_q, 4, dk)), dtype)
                    k = jnp.asarray(rng.standard_normal((2, 90, 2, dk)), dtype)
                    v = jnp.asarray(rng.standard_normal((2, 90, 2, dv)), dtype)
                    kv_len = jnp.array([90, 0], jnp.int32)
                    try:
                        got = jax.block_until_ready(
                            jax_mla.flash_attention(
                                q, k, v, causal=True, kv_len=kv_len, backend="native"
                            )
                        )
                    except Exception as e:  # a family without this pair says so (kernel_table.h)
                        if f"kernel {family} takes" not in str(e):
                            raise
                        print(f"attention {family} {dk}/{dv}: not one of its pairs", flush=True)
                        break
                    want = ref_attention(
                        q, k, v, dk**-0.5, True, np.asarray(kv_len) - seq_q, np.asarray(kv_len)
                    )
                    check(f"attention {family} {dtype.name} {dk}/{dv} Sq={seq_q}", got, want, tol)
        os.environ.pop("JAX_MLA_CUDA_ATTENTION_KERNEL")
        quantized_attention_cases(caps, rng, check, dtype, tol, quick)
        backward_cases(caps, rng, dtype, quick, check)
    if "flash_mla" in caps.get("paged_ops", []):
        paged_cases(caps, rng, check, jnp.dtype(jnp.bfloat16), 2e-2, quick)
    if "flash_attention" in caps.get("paged_ops", []):
        paged_attention_cases(caps, rng, check, jnp.dtype(jnp.bfloat16), 2e-2, quick)
    print("sanitize cases:", "all ok" if bad == 0 else f"{bad} FAILED", flush=True)


if __name__ == "__main__":
    main()
