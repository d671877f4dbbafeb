"""The benchmark's own checks on the rows CI's `--quick` run does not reach:
op-level rows over quantized caches (each kernel checked against the reference
before it is timed) and model-level rows over an 8-bit cache, where the modes
must agree within the 8-bit tolerance. A row that fails its check makes
`main` return nonzero."""

from __future__ import annotations

import json

from jax_mla import bench


def test_quantized_op_rows_pass_their_checks(cpu, tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--tests", "tg@256,pp16@256", "--caches", "q8_0,q8_kv,q6_0", "--no-model",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["cache"], r["backend"]) for r in rows} >= {
        (c, b) for c in ("q8_0", "q8_kv", "q6_0") for b in ("native", "jax")}
    assert all(r["err"] <= bench.TOLERANCE[r["backend"]][r["cache"]] for r in rows)


def test_model_rows_over_an_8bit_cache_agree(cpu, tmp_path):
    out = tmp_path / "model.json"
    assert bench.main(["--model-only", "--model-caches", "q8_0", "--model-tests", "tg64@256",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["model_rows"]
    assert {r["mode"] for r in rows} == {"standard", "latent", "hybrid"}
    assert all(r["vs_std"] is not None and r["vs_std"] <= bench.model_agreement("q8_0")
               for r in rows)
