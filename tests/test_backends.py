"""The native CPU module is what the tests exercise: it loaded, registered its
targets, and is used by default; the package under test is the installed one."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _backend, _ffi

from .conftest import assert_close, randn

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_module_loaded_with_both_targets():
    cpu = jax_mla.backends()["cpu"]
    assert cpu["loaded"] is True, cpu["error"]
    assert cpu["error"] is None
    assert {"jax_mla_flash_attention", "jax_mla_flash_mla"} <= set(cpu["targets"])
    assert "generic" in cpu["supported_isas"]
    assert set(cpu["supported_isas"]) <= set(cpu["built_isas"])


def test_package_under_test_is_the_built_one():
    # The repo's jax_mla/ folder has no native module; importing it instead of
    # the installed package would silently compare the reference with itself.
    package = pathlib.Path(jax_mla.__file__).resolve().parent
    assert package != REPO / "jax_mla", f"jax_mla imported from the source tree {package}"
    assert list(package.glob("_cpu*.so")), f"no native _cpu module next to {package}"


@pytest.mark.kernel_config(
    "attention", dtypes=(jnp.float32, jnp.float16, jnp.float16), dk=64, dv=32
)
def test_default_backend_is_the_native_kernel(rng, platform):
    q = randn(rng, (2, 3, 4, 64), jnp.float32)
    k = randn(rng, (2, 40, 2, 64), jnp.float16)
    v = randn(rng, (2, 40, 2, 32), jnp.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback to the reference warns
        default = jax_mla.flash_attention(q, k, v, causal=True)
        native = jax_mla.flash_attention(q, k, v, causal=True, backend="native")
    np.testing.assert_array_equal(np.asarray(default), np.asarray(native))
    reference = jax_mla.flash_attention(q, k, v, causal=True, backend="reference")
    assert_close(default, reference, jnp.float32)


@pytest.fixture
def cpu_module_missing(monkeypatch):
    """As if jax_mla._cpu had failed to import (a build without a compiler)."""
    monkeypatch.setattr(_ffi, "_loaded", {})
    monkeypatch.setattr(_ffi, "_targets", {})
    monkeypatch.setattr(_ffi, "_load_errors", {"cpu": "jax_mla._cpu did not load (simulated)"})
    monkeypatch.setattr(_backend, "_warned", set())


def test_without_the_module_native_is_an_error_and_default_warns_once(rng, cpu, cpu_module_missing):
    q = randn(rng, (1, 2, 4, 64), jnp.float32)
    kv = randn(rng, (1, 10, 64), jnp.float32)
    assert jax_mla.backends()["cpu"]["loaded"] is False
    assert "simulated" in jax_mla.backends()["cpu"]["error"]
    with pytest.raises(
        RuntimeError, match=r"backend='native' but jax_mla._cpu did not load .*pip install"
    ):
        jax_mla.flash_mla(q, kv, dv=32, backend="native")
    with pytest.warns(
        RuntimeWarning, match=r"using the pure-JAX reference on cpu because jax_mla._cpu"
    ):
        out = jax_mla.flash_mla(q, kv, dv=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = jax_mla.flash_mla(q, kv, dv=32)
    want = jax_mla.flash_mla(q, kv, dv=32, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(want))


def _python(code: str, cwd, **env):
    """Runs `code` in a fresh interpreter (import-time behaviour), returning it
    finished: its stdout and stderr are in the result."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_an_invalid_cpu_isa_switch_is_reported_at_import():
    run = _python(
        "import jax_mla; print(jax_mla.backends()['cpu']['error'])",
        REPO.parent,
        JAX_MLA_CPU_ISA="avx3",
    )
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning: jax_mla: JAX_MLA_CPU_ISA=avx3 is not one of auto," in run.stderr
    assert run.stdout.startswith("JAX_MLA_CPU_ISA=avx3 is not one of auto,")
    fine = _python(
        "import jax_mla; print(jax_mla.backends()['cpu']['error'])",
        REPO.parent,
        JAX_MLA_CPU_ISA="generic",
    )
    assert fine.returncode == 0 and "Warning" not in fine.stderr, fine.stderr
    assert fine.stdout.strip() == "None"


def test_importing_the_source_tree_says_what_to_do(tmp_path):
    # A copy of the source tree as a clone has it: no compiled modules.
    shutil.copytree(
        pathlib.Path(jax_mla.__file__).parent,
        tmp_path / "jax_mla",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "ffi").mkdir()
    run = _python("import jax_mla", tmp_path)
    assert run.returncode == 1
    assert "ImportError: jax_mla was imported from its source tree" in run.stderr, run.stderr
    assert "pip install ." in run.stderr and "python -P -m jax_mla" in run.stderr


def test_one_version_and_typed_package():
    # pyproject takes the version from __init__.py, so the installed metadata agrees.
    assert importlib.metadata.version("jax_mla") == jax_mla.__version__
    assert (pathlib.Path(jax_mla.__file__).parent / "py.typed").is_file()
