"""The benchmark package: its timer and case tables as units, and the quick
benchmark pieces on the CPU on the rows CI's `--quick` run does not reach:
op rows over quantized caches (each kernel checked against the reference
before it is timed) and layer rows over an 8-bit cache, where the modes must
agree within the 8-bit tolerance. A row that fails its check makes `main`
return nonzero."""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_mla import deepseek
from jax_mla.bench import backward, baselines, cases, cli, layer, ops, report, sharded, timing

from .test_deepseek import SMALL, assert_rel


class FakeClock:
    """perf_counter for the timer: each call of fn advances it by the next duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, iter(durations), []

    def perf_counter(self):
        return self.now

    def fn(self, i):
        self.calls.append(i)
        self.now += next(self.durations)
        return i


def test_timer_takes_the_best_pass_of_medians(monkeypatch):
    # First call 10 ms: 10 samples a pass for a 0.1 s budget. Each pass has one
    # slow call; the second pass is slower throughout.
    passes = [[0.010] * 9 + [0.5], [0.012] * 9 + [0.5], [0.010] * 9 + [0.5]]
    clock = FakeClock([0.010] + [d for p in passes for d in p])
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    synced = []
    t = timing.time_calls(clock.fn, lambda i: (i,), budget_s=0.1, sync=synced.append)
    assert (t.calls, t.samples, t.passes) == (1, 10, 3)
    assert t.seconds == pytest.approx(0.010)
    assert clock.calls == list(range(31))  # one warm-up call, then fresh arguments each call
    assert synced[-1] == 30  # waited for the last call's output


def test_timer_back_to_back_and_long_calls(monkeypatch):
    clock = FakeClock([0.001] * 1000)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    t = timing.time_calls(
        clock.fn, lambda i: (i,), budget_s=0.1, back_to_back=True, sync=lambda x: x
    )
    # 30 calls make a 30 ms sample; 0.1 s / 30 ms rounds to 3 samples a pass.
    assert (t.calls, t.samples, t.passes) == (30, 3, 3)
    assert t.seconds == pytest.approx(0.001)
    assert len(clock.calls) == 1 + 30 * 3 * 3
    long = FakeClock([timing.LONG_CALL_S + 1])
    monkeypatch.setattr(timing.time, "perf_counter", long.perf_counter)
    t = timing.time_calls(long.fn, lambda i: (i,), budget_s=0.1, sync=lambda x: x)
    assert (t.seconds, t.calls, t.samples, t.passes, long.calls) == (
        timing.LONG_CALL_S + 1,
        1,
        1,
        1,
        [0],
    )


def test_copies_past_l2():
    assert timing.copies_past_l2(10**9) == 1
    assert timing.copies_past_l2(100 * 10**6) == 3
    assert timing.copies_past_l2(1000) == timing.MAX_COPIES


def test_case_arithmetic():
    decode = cases.Case("flash_mla", 1, 4096, "f16", batch=64, heads=16, query="bf16")
    assert (decode.test, decode.causal, decode.kv_heads) == ("tg@4096", False, 1)
    assert decode.kv_bytes_per_token == 576 * 2
    assert decode.cache_bytes == 64 * 4096 * 576 * 2
    assert decode.flops == 2 * 64 * 16 * 4096 * (576 + 512)
    q8 = cases.Case("flash_mla", 1, 4096, "q8_0")
    assert q8.kv_bytes_per_token == 576 + 2 * 576 // 32  # int8 values + an f16 scale per 32
    prefill = cases.Case("flash_attention", 3, 10, "f32", heads=2)
    assert (prefill.test, prefill.causal, prefill.kv_heads) == ("pp3@10", True, 2)
    assert prefill.visible_keys == 8 + 9 + 10
    assert prefill.kv_bytes_per_token == 2 * (192 + 128) * 4
    assert prefill.flops == 2 * 2 * 27 * (192 + 128)


def test_parse_test():
    assert cases.parse_test("tg@1024") == (1, 1024)
    assert cases.parse_test("pp512@4096") == (512, 4096)
    for bad in ("tg1024", "pp@4", "pp8@4", "pp0@4"):
        with pytest.raises(argparse.ArgumentTypeError):
            cases.parse_test(bad)


def test_cpu_cases_are_the_sweep():
    tests = [cases.parse_test(t) for t in cases.CPU_QUICK_TESTS]
    got = cases.cpu_cases(tests, cases.OPS, ["f16", "q8_0"])
    assert len(got) == len(tests) * 2 * 2
    assert {(c.batch, c.heads, c.query) for c in got} == {(1, 16, "f32")}
    assert {c.test for c in got} == set(cases.CPU_QUICK_TESTS)


def test_gpu_cases_are_the_issue_shapes():
    got = cases.gpu_cases(quick=False)
    assert {c.query for c in got} == {"bf16"}
    mla = [c for c in got if c.op == "flash_mla" and c.cache == "bf16"]
    assert [(c.batch, c.heads, c.n_kv) for c in mla] == [
        (1, 16, 16384),
        (64, 16, 4096),
        (64, 16, 16384),
        (128, 128, 4096),
        (128, 128, 8192),
        (32, 128, 32768),
    ]
    assert all(c.seq_q == 1 and c.dims == (576, 512) for c in mla)
    quant = [c for c in got if c.op == "flash_mla" and c.cache != "bf16"]
    rows = {(c.batch, c.heads, c.n_kv) for c in quant}
    assert len(rows) >= 2 and rows <= {(c.batch, c.heads, c.n_kv) for c in mla}
    assert (64, 16, 16384) in rows  # the memory-bound row the 8-bit caches aim at
    assert {c.cache for c in quant} == {"q8_0", "q8_kv", "fp8_e4m3"}
    assert len(quant) == 3 * len(rows)
    std = [c for c in got if c.op == "flash_attention"]
    assert all(c.dims == (192, 128) and c.kv_heads == c.heads for c in std)
    prefill = [c for c in std if c.seq_q > 1]
    assert {(c.heads, c.seq_q) for c in prefill} >= {(16, 4096), (128, 4096)}
    assert all(c.causal and c.seq_q == c.n_kv and c.batch == 1 for c in prefill)
    decode = [c for c in std if c.seq_q == 1]
    assert {(c.batch, c.heads, c.n_kv) for c in decode} >= {(64, 16, 4096)}
    # Every 192/128 row over bf16 and over q8_0, next to each other.
    shapes = [(c.batch, c.heads, c.seq_q, c.n_kv) for c in std]
    assert [c.cache for c in std] == ["bf16", "q8_0"] * (len(std) // 2)
    assert shapes[::2] == shapes[1::2]
    quick = cases.gpu_cases(quick=True)
    assert 0 < len(quick) < len(got)
    assert max(c.seq_q for c in quick if c.op == "flash_attention") < 4096
    assert {c.op for c in cases.gpu_cases(False, ["flash_mla"])} == {"flash_mla"}
    # every GPU row has a tolerance for both backends
    assert all(c.cache in ops.TOLERANCE["gpu"][b] for c in got for b in ops.BACKENDS)


def test_gpu_row_path_runs_on_the_cpu(cpu):
    # The GPU way of timing (back-to-back calls over copies rotated past the
    # L2) on a small bf16 decode case; the CPU kernels take bf16 too.
    case = cases.Case("flash_mla", 1, 256, "bf16", batch=1, heads=16, query="bf16")
    rows = ops.run_case(case, "gpu", budget_s=0.02)
    assert [r.backend for r in rows] == list(ops.BACKENDS)
    for r in rows:
        assert r.copies == timing.MAX_COPIES and r.calls >= timing.MIN_CALLS
        assert r.err <= r.tolerance == ops.TOLERANCE["gpu"][r.backend]["bf16"]
        assert math.isfinite(r.ms) and r.gbps == pytest.approx(case.cache_bytes / r.ms / 1e6)


def test_cpu_sweep_flags_are_refused_on_a_gpu():
    args, parser = cli.parse_args(["--caches", "f16"])
    with pytest.raises(SystemExit):
        cli.op_cases(args, parser, "gpu")


def test_quantized_op_rows_pass_their_checks(cpu, tmp_path):
    out = tmp_path / "rows.json"
    assert (
        cli.main(
            [
                "--quick",
                "--tests",
                "tg@256,pp16@128",
                "--caches",
                "q8_0,fp8_e4m3",
                "--no-model",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["cache"], r["backend"]) for r in rows} == {
        (c, b) for c in ("q8_0", "fp8_e4m3") for b in ("native", "jax")
    }
    assert all(
        r["err"] <= r["tolerance"] == ops.TOLERANCE["cpu"][r["backend"]][r["cache"]]
        and math.isfinite(r["ms"])
        for r in rows
    )
    meta = data["meta"]
    assert meta["device"]["platform"] == "cpu" and meta["cpu"]["isa"]
    assert set(meta["versions"]) == {"python", "jax", "jaxlib", "numpy", "jax_mla"}
    assert "--caches q8_0,fp8_e4m3" in meta["command"] and "commit" in meta


def test_a_failing_check_fails_the_run(cpu, monkeypatch, capsys):
    monkeypatch.setitem(ops.TOLERANCE["cpu"]["native"], "f16", 0.0)
    assert (
        cli.main(["--tests", "tg@64", "--caches", "f16", "--ops", "flash_mla", "--no-model"]) == 1
    )
    assert "FAILED CHECK: tg@64 B=1 H=16 flash_mla f16 native" in capsys.readouterr().err


def test_model_rows_over_an_8bit_cache_agree(cpu, tmp_path):
    out = tmp_path / "model.json"
    assert (
        cli.main(
            [
                "--quick",
                "--model-only",
                "--model-caches",
                "q8_0",
                "--model-tests",
                "tg64@128",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["model_rows"]
    assert {r["mode"] for r in rows} == {"standard", "latent", "hybrid"}
    assert all(
        r["vs_std"] is not None and r["vs_std"] <= layer.model_agreement("q8_0") for r in rows
    )


def test_sharded_rows_need_several_devices(cpu, capsys):
    # This process has one CPU device: the option says how to get fake ones.
    # The rows themselves run in tests/sharded_cases.py, on 8 devices.
    assert cli.main(["--sharded", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "sharding needs several" in err
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in err


def test_sharded_specs_put_each_dim_on_its_axis():
    assert sharded.specs("flash_attention", "batch+heads") == (
        P("batch", None, "heads"),
        P("batch", None, "heads"),
    )
    # flash_mla's latent cache is read by every head: replicated over "heads".
    assert sharded.specs("flash_mla", "heads+context") == (
        P(None, None, "heads"),
        P(None, "context", None),
    )
    assert sharded.specs("flash_mla", "batch") == (P("batch", None, None), P("batch", None, None))


def test_sharded_cases_divide_over_the_devices():
    got = sharded.sharded_cases([(1, 1000)], cases.OPS, ["f16"], "cpu", 6)
    assert [(c.op, c.batch, c.heads, c.n_kv, c.query) for c in got] == [
        (op, 6, 18, 1002, "f32") for op in cases.OPS
    ]
    assert {
        (c.batch, c.heads, c.query)
        for c in sharded.sharded_cases([(1, 64)], ["flash_mla"], ["bf16"], "gpu", 4)
    } == {(64, 128, "bf16")}


def test_backward_rows_check_time_and_record(cpu, monkeypatch, tmp_path):
    # A tiny gradient table: each op's step against plain JAX's, checked,
    # timed, with XLA's temporaries; the JSON keeps the rows.
    monkeypatch.setattr(backward, "CPU_QUICK_TESTS", ((48, 2, "f32"), (40, 3, "bf16")))
    out = tmp_path / "backward.json"
    assert cli.main(["--backward", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["backward_rows"]
    assert [(r["op"], r["test"], r["dtype"], r["heads"]) for r in rows] == [
        (op, test, dtype, heads)
        for op in cases.OPS
        for test, dtype, heads in (("pp48", "f32", 2), ("pp40", "bf16", 3))
    ]
    for r in rows:
        assert r["err"] <= r["tolerance"] and r["backward"] == "native", r
        assert math.isfinite(r["ms"]) and r["speedup"] == pytest.approx(r["jax_ms"] / r["ms"])
        assert r["tflops"] > 0 and r["temp_mib"] >= 0 and r["jax_temp_mib"] >= 0


def test_backward_check_runs_on_fewer_heads_when_plain_jax_cannot_fit(cpu, monkeypatch, capsys):
    # A device too small for the plain step's S x S scores: its columns stay
    # empty, and the check compares both on the heads that fit.
    monkeypatch.setattr(backward, "device_bytes", lambda: 4 * 32 * 32 * 3 * 4)  # 3 heads at S=32
    assert backward.check_heads(32, 8) == 3
    row = backward.run_case("flash_attention", 32, 8, "f32", 0.01)
    assert row.err <= row.tolerance and row.jax_ms is None and row.speedup is None
    assert math.isfinite(row.ms) and row.jax_temp_mib is None


def test_backward_flops_count_the_causal_step():
    # Forward: 2 S^2 H (Dk + Dv) / 2; the backward 2.5 times that.
    assert backward.flops(4, 2, 3, 5) == 3.5 * 2 * 16 * 2 * 8 / 2


def test_plain_layer_baseline_computes_the_layer(cpu):
    """The layer rows' plain-JAX baseline is the same function as the layer:
    a prefill over two rows at different lengths, then a decode step."""
    params = deepseek.init_params(jax.random.PRNGKey(0), SMALL)
    plain = jax.jit(baselines.plain_deepseek_attention, static_argnames="cfg")
    ours = jax.jit(deepseek.attention, static_argnames=("cfg", "mode"))
    caches = [deepseek.init_cache(SMALL, 2, 24, jnp.float32) for _ in range(2)]
    for starts, seq in ((np.array([0, 3]), 9), (np.array([9, 12]), 1)):
        x = jax.random.normal(jax.random.PRNGKey(seq), (2, seq, SMALL.hidden_size))
        pos = jnp.asarray(starts[:, None] + np.arange(seq), jnp.int32)
        want, caches[0] = ours(params, x, pos, caches[0], cfg=SMALL, mode="standard")
        got, caches[1] = plain(params, x, pos, caches[1], cfg=SMALL)
        # float32 both; the plain layer sums over all keys at once.
        assert_rel(got, want, 1e-5, f"{seq} tokens")
        np.testing.assert_array_equal(np.asarray(caches[1].length), starts + seq)


class _FailingCall:
    """A jitted layer call whose compile fails with `message`."""

    def __init__(self, message: str):
        self.message = message

    def lower(self, *args):
        raise RuntimeError(self.message)


def _run_failing_row(monkeypatch, message: str):
    fail = lambda *args: (_FailingCall(message), lambda: (), 1, 1)
    monkeypatch.setattr(layer, "_model_call", fail)
    return layer.run_model_case("pp", 16, "f16", ["plain"], SMALL, {}, 0.1, batch=2)


def test_a_layer_row_out_of_memory_says_so(monkeypatch):
    """A layer call that runs out of device memory (the plain layer at long
    contexts and large batches) gives a row that says OOM, not a failed run."""
    (row,) = _run_failing_row(monkeypatch, "RESOURCE_EXHAUSTED: Out of memory allocating")
    assert row.error == "OOM" and math.isnan(row.ms) and row.vs_std is None
    assert not layer.model_failed(row)
    assert "|  2 | plain    | f16   |        OOM |" in report.model_table_row(row)


def test_other_layer_errors_are_not_taken_for_memory(monkeypatch):
    with pytest.raises(RuntimeError, match="INTERNAL: a kernel failed"):
        _run_failing_row(monkeypatch, "INTERNAL: a kernel failed")
