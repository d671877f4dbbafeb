"""The type stubs of the native modules (jax_mla/_cpu.pyi, jax_mla/_cuda.pyi)
against the modules themselves: every public name a module has is declared
in its stub, every function the stub declares exists, with the parameter
names and defaults the module's binding has (nanobind's __nb_signature__).
A module that did not load (the CUDA one without nvcc) is skipped."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import jax_mla  # noqa: F401  (loads the native modules the way users do)

MODULES = ["_cpu", "_cuda"]


def load(name: str):
    try:
        return importlib.import_module(f"jax_mla.{name}")
    except ImportError as e:
        pytest.skip(f"jax_mla.{name} did not load: {e}")


def stub_functions(module) -> dict[str, ast.FunctionDef]:
    """The functions the module's .pyi declares (the stub sits next to the
    compiled module, in the package)."""
    path = Path(module.__file__).parent / f"{module.__name__.rsplit('.', 1)[1]}.pyi"
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def parameters(fn: ast.FunctionDef) -> list[tuple[str, bool]]:
    """(name, has a default) for each parameter."""
    args = fn.args.posonlyargs + fn.args.args
    defaults = [False] * (len(args) - len(fn.args.defaults)) + [True] * len(fn.args.defaults)
    return [(a.arg, d) for a, d in zip(args, defaults)]


def binding(module, name: str) -> ast.FunctionDef:
    """The module's own signature of `name`, as nanobind writes it ("def f(x: int) -> int")."""
    (signature, *_), *overloads = getattr(module, name).__nb_signature__
    assert not overloads, f"{module.__name__}.{name} has overloads the stub cannot describe"
    # nanobind writes a default as \N, the index of its value in the third field.
    return ast.parse(re.sub(r"\\\d+", "...", signature) + ": ...").body[0]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_is_declared(name):
    module = load(name)
    public = {n for n in dir(module) if not n.startswith("_")}
    missing = public - set(stub_functions(module))
    assert not missing, f"jax_mla/{name}.pyi does not declare {sorted(missing)}"


@pytest.mark.parametrize("name", MODULES)
def test_every_declared_function_exists_with_its_parameters(name):
    module = load(name)
    for fn_name, fn in stub_functions(module).items():
        assert callable(getattr(module, fn_name, None)), (
            f"jax_mla/{name}.pyi declares {fn_name}(), which jax_mla.{name} does not have"
        )
        assert parameters(fn) == parameters(binding(module, fn_name)), (
            f"jax_mla/{name}.pyi: {fn_name} takes {parameters(fn)}, "
            f"the module's takes {parameters(binding(module, fn_name))}"
        )
