"""The scripts in examples/ run (on the CPU, with their small default
shapes) and compute what the layer computes without them."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_mla import deepseek as ds

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples.{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_continuous_batching_runs():
    # Run as users do, from its own folder's parent: the script's folder goes
    # on sys.path, not a jax_mla/ source folder.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "continuous_batching.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"\d+ tokens/s", out), out
    peak, contiguous = map(float, re.search(r"= ([\d.]+) KiB; .*: ([\d.]+) KiB", out).groups())
    assert 0 < peak < contiguous, out


def test_continuous_batching_matches_each_request_alone():
    """Every request's outputs, served among others over shared, reused
    pages, are those of the request run alone on a contiguous cache of its
    own: its prompt, then one token at a time, each input the previous
    output renormalized (as the example, and deepseek.generate, feed it)."""
    example = load("continuous_batching")
    cfg = example.CFG
    params = ds.init_params(jax.random.PRNGKey(1), cfg)
    requests = example.make_requests(8, seed=3)
    stats = example.serve(requests, params, fmt="f32", slots=3, num_pages=16)
    assert stats["pages_left"] == 0
    assert stats["pages_taken"] > 16, "the run must reuse freed pages"
    assert stats["decode_tokens"] == sum(r.max_new for r in requests)
    step = jax.jit(ds.attention, static_argnames=("cfg", "mode"))
    for r in requests:
        n = len(r.prompt)
        cache = ds.init_cache(cfg, 1, example.MAX_PAGES * example.PAGE_SIZE, "f32")
        out, cache = step(
            params,
            jnp.asarray(r.prompt[None]),
            jnp.arange(n, dtype=jnp.int32)[None],
            cache,
            cfg=cfg,
        )
        x, want = example.renorm(out[:, -1:]), []
        for t in range(r.max_new):
            y, cache = step(params, x, jnp.full((1, 1), n + t, jnp.int32), cache, cfg=cfg)
            want.append(np.asarray(y[0, 0]))
            x = example.renorm(y)
        got, want = np.stack(r.outputs), np.stack(want)
        # float32 rounding of differently batched matmuls, fed back step by step.
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, f"request {r.rid}: max rel error {err:.3g}"
