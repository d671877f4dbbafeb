"""The capability tables the native modules export, the checks that read
them, and the collection filter that drops the GPU cases the CUDA table does
not take (tested here with made-up tables, so it runs without a GPU)."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, _ffi, quant

from .conftest import cuda_takes, kernel_configs, mentions_gpu, randn, unsupported_gpu_cases

# A CUDA table shaped like the module's.
CUDA = {
    "dtypes": ["float16", "bfloat16"],
    "attention_head_dims": [[192, 128], [64, 64], [128, 128], [256, 256]],
    "attention_bwd_head_dims": [[192, 128], [64, 64], [128, 128], [256, 256]],
    "mla_layouts": [[576, 512, 0]],
    "mla_formats": {"q8_0": 1, "q8_kv": 2},
    "attention_formats": {"q8_0": 1, "q8_kv": 2},
    "attention_quant_head_dims": [[192, 128]],
    "mla_kernels": ["auto"],
    "attention_kernels": ["auto"],
}
F16, BF16, F32 = jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def test_cpu_table_agrees_with_the_module():
    table = _capabilities.cpu()
    module = _ffi.module("cpu")
    assert table["kv_tile"] == module.kv_tile()
    assert sorted(table["formats"]) == sorted(quant.FORMATS)
    assert sorted(table["formats"].values()) == [1, 2, 3, 4]  # 0 is a float cache
    assert table["dtypes"] == ["float32", "float16", "bfloat16"]
    assert table["max_head_dim"] % table["head_dim_multiple"] == 0


def test_cpu_head_dim_rule_is_the_kernels(rng, cpu):
    # The largest head dim the table allows runs; one step more is refused
    # by the Python check, with the table's numbers in the message.
    largest, step = _capabilities.cpu()["max_head_dim"], _capabilities.cpu()["head_dim_multiple"]
    q = randn(rng, (1, 1, 2, largest), jnp.float32)
    kv = randn(rng, (1, 5, largest), jnp.float32)
    out = jax_mla.flash_mla(q, kv, dv=step, backend="native")
    want = jax_mla.flash_mla(q, kv, dv=step, backend="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    wide = randn(rng, (1, 1, 2, largest + step), jnp.float32)
    with pytest.raises(
        NotImplementedError, match=f"multiples of {step} up to {largest}; got Dk = {largest + step}"
    ):
        jax_mla.flash_mla(
            wide, randn(rng, (1, 5, largest + step), jnp.float32), dv=step, backend="native"
        )


def test_cpu_calls_never_read_the_cuda_table(rng, cpu, monkeypatch):
    def no_cuda():
        raise AssertionError("a CPU call read the CUDA table")

    monkeypatch.setattr(_capabilities, "cuda", no_cuda)
    q = randn(rng, (1, 2, 4, 64), jnp.float32)
    kv = jax_mla.quantize(randn(rng, (1, 40, 64), jnp.float32), "q8_0")
    jax_mla.flash_mla(q, kv, dv=32, backend="native")
    k = randn(rng, (1, 40, 2, 64), jnp.float16)
    v = jax_mla.quantize(randn(rng, (1, 40, 2, 32), jnp.float32), "q8_kv")
    jax_mla.flash_attention(q, k, v, backend="native")


def test_cuda_messages_come_from_the_table():
    problem = _capabilities.cuda_attention_problem(CUDA, dict(q=F32, k=F32, v=F32), 64, 64)
    assert problem.startswith(
        "the CUDA kernel takes q, k, v all float16 or all bfloat16; got "
        "q float32, k float32, v float32"
    )
    problem = _capabilities.cuda_attention_problem(CUDA, dict(q=F16, k=F16, v=F16), 80, 80)
    assert "(Dk, Dv) in ((192, 128), (64, 64), (128, 128), (256, 256)); got (80, 80)" in problem
    problem = _capabilities.cuda_mla_problem(CUDA, dict(q=BF16, kv=BF16), None, 192, 128, 0)
    assert "(Dk, dv, v_offset) = (576, 512, 0); got (192, 128, 0)" in problem
    problem = _capabilities.cuda_mla_problem(CUDA, dict(q=BF16), "q6_0", 576, 512, 0)
    assert "quantized caches in q8_0, q8_kv; got q6_0" in problem
    problem = _capabilities.cuda_mla_problem(CUDA, dict(q=F32), "q8_0", 576, 512, 0)
    assert "takes q float16 or bfloat16 over a quantized cache; got q float32" in problem
    assert _capabilities.cuda_mla_problem(CUDA, dict(q=BF16), "q8_kv", 576, 512, 0) is None


def test_cuda_quantized_attention_messages_come_from_the_table():
    problem = _capabilities.cuda_attention_problem
    assert problem(CUDA, dict(q=BF16), 192, 128, "q8_0", "q8_kv") is None
    assert problem(CUDA, dict(q=F16), 192, 128, "q8_kv", "q8_kv") is None
    assert (
        "takes quantized k and v both in q8_0 or q8_kv (each its own), or both float; "
        "got k q6_0, v q8_0"
    ) in problem(CUDA, dict(q=BF16), 192, 128, "q6_0", "q8_0")
    assert "got k bfloat16, v q8_0" in problem(CUDA, dict(q=BF16, k=BF16), 192, 128, None, "q8_0")
    assert "got k q8_kv, v float16" in problem(CUDA, dict(q=F16, v=F16), 192, 128, "q8_kv", None)
    assert "takes q float16 or bfloat16 over quantized caches; got q float32" in problem(
        CUDA, dict(q=F32), 192, 128, "q8_0", "q8_0"
    )
    assert "(Dk, Dv) in ((192, 128),) over quantized caches; got (128, 128)" in problem(
        CUDA, dict(q=F16), 128, 128, "q8_0", "q8_0"
    )
    # A module without the kernel lists no formats.
    table = {k: v for k, v in CUDA.items() if not k.startswith("attention_quant")}
    table.pop("attention_formats")
    assert "in no quantized format" in problem(table, dict(q=F16), 192, 128, "q8_0", "q8_0")


def test_cuda_attention_check_reads_quantized_caches(rng, monkeypatch):
    # The check the op makes on GPU calls, over a made-up table: a QuantizedKV
    # is named by its format, a float cache by its dtype.
    monkeypatch.setattr(_capabilities, "cuda", lambda: CUDA)
    q = randn(rng, (1, 1, 4, 192), jnp.bfloat16)
    k8 = jax_mla.quantize(randn(rng, (1, 8, 2, 192), jnp.float32), "q8_0")
    v8 = jax_mla.quantize(randn(rng, (1, 8, 2, 128), jnp.float32), "q8_kv")
    v_float = randn(rng, (1, 8, 2, 128), jnp.bfloat16)
    _capabilities.check_cuda_attention("flash_attention", q, k8, v8)
    with pytest.raises(NotImplementedError, match="flash_attention: .*got k q8_0, v bfloat16"):
        _capabilities.check_cuda_attention("flash_attention", q, k8, v_float)
    v6 = jax_mla.quantize(randn(rng, (1, 8, 2, 128), jnp.float32), "q6_0")
    with pytest.raises(NotImplementedError, match=r"got k q8_0, v q6_0"):
        _capabilities.check_cuda_attention("flash_attention", q, k8, v6)


def test_cuda_rule_follows_the_table():
    wider = dict(
        CUDA,
        dtypes=["float32", *CUDA["dtypes"]],
        attention_head_dims=[[80, 48]],
        mla_layouts=[[576, 512, 0], [576, 512, 64]],
    )
    assert not cuda_takes(CUDA, "attention", dtypes=(F32,) * 3, dk=80, dv=48)
    assert cuda_takes(wider, "attention", dtypes=(F32,) * 3, dk=80, dv=48)
    assert not cuda_takes(wider, "attention", dtypes=(F16,) * 3, dk=192, dv=128)
    assert not cuda_takes(CUDA, "mla", dtypes=(BF16,) * 2, dk=576, dv=512, v_offset=64)
    assert cuda_takes(wider, "mla", dtypes=(BF16,) * 2, dk=576, dv=512, v_offset=64)
    assert not cuda_takes(CUDA, "mla", dtypes=(F16, BF16), dk=576, dv=512)
    problem = _capabilities.cuda_mla_problem(wider, dict(q=BF16, kv=BF16), None, 64, 32, 0)
    assert "in ((576, 512, 0), (576, 512, 64)); got (64, 32, 0)" in problem


def item(platform, *markers, **params):
    """A stand-in for a collected test item: its markers and its parameters."""
    marks = [m.mark for m in markers]
    if platform == "gpu":
        marks.append(pytest.mark.gpu.mark)
    return types.SimpleNamespace(
        callspec=types.SimpleNamespace(params=dict(platform=platform, **params)),
        iter_markers=lambda name: [m for m in marks if m.name == name],
        get_closest_marker=lambda name: next((m for m in marks if m.name == name), None),
    )


def test_gpu_cases_the_table_does_not_take_are_dropped():
    attention = pytest.mark.kernel_config("attention", dk=64, dv=64)
    mla = pytest.mark.kernel_config("mla", dtypes=(F32, F32), dk=576, dv=512)
    half, f32 = (F16,) * 3, (F32,) * 3
    cases = {
        "cpu": (item("cpu", attention, dtypes=f32), False),
        "supported": (item("gpu", attention, dtypes=half), False),
        "dtype": (item("gpu", attention, dtypes=f32), True),
        "dims_param": (item("gpu", attention, dtypes=half, dk=80, dv=48), True),
        "dict_param": (item("gpu", attention, case=dict(dtypes=half, dk=80, dv=48)), True),
        "reference_backend": (item("gpu", attention, mla, dtypes=f32, backend="reference"), False),
        "op_attention": (item("gpu", attention, mla, op="attention", dtypes=half), False),
        "op_mla": (item("gpu", attention, mla, op="mla"), True),
        "one_of_two_calls": (
            item("gpu", pytest.mark.kernel_config("attention", dtypes=half, dk=64, dv=64), mla),
            True,
        ),
        "no_marker": (item("gpu", dtypes=f32), False),
    }
    dropped = unsupported_gpu_cases([case for case, _ in cases.values()], CUDA)
    assert [name for name, (case, _) in cases.items() if case in dropped] == [
        name for name, (_, drop) in cases.items() if drop
    ]


def test_kernel_configs_merge_marker_and_parameters():
    marker = pytest.mark.kernel_config("mla", dtypes=(F32, F32), dk=576, dv=512)
    configs = kernel_configs(item("gpu", marker, case=dict(dv=64, heads=4), v_offset=16))
    assert configs == [("mla", dict(dtypes=(F32, F32), dk=576, dv=64, v_offset=16))]


@pytest.mark.parametrize(
    "markexpr, selects_gpu",
    [("", False), ("gpu", True), ("not gpu", True), ("gpu and not slow", True), ("gpux", False)],
)
def test_gpu_tests_run_only_when_the_marker_expression_names_them(markexpr, selects_gpu):
    assert mentions_gpu(markexpr) == selects_gpu


def test_cuda_backward_table_rule():
    problem = _capabilities.cuda_attention_bwd_problem
    same = dict(q=BF16, k=BF16, v=BF16, dout=BF16)
    assert problem(CUDA, same, 192, 128) is None
    assert "(Dk, Dv)" in problem(CUDA, same, 576, 512)  # flash_mla's layout: pure JAX
    assert "dout" in problem(CUDA, dict(same, dout=F16), 192, 128)
    assert "float32" in problem(CUDA, dict(same, q=F32), 64, 64)
    # A module built before the backward existed lists no pairs.
    table = {k: v for k, v in CUDA.items() if k != "attention_bwd_head_dims"}
    assert problem(table, same, 64, 64) is not None
