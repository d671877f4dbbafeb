"""Loads the native modules and registers their FFI targets with XLA.

Each module exposes registrations() -> {target name: capsule}; CPU targets are
registered for platform "cpu", CUDA targets for "CUDA" (docs/design.md, "XLA
FFI conventions"). A module that fails to import is recorded with the reason,
so backends() and the backend=None warning can say why.
"""

from __future__ import annotations

import importlib
import pathlib
import warnings

import jax

# platform name used by JAX -> (module, platform name the FFI registry wants)
_MODULES = {"cpu": ("_cpu", "cpu"), "gpu": ("_cuda", "CUDA")}

_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_targets: dict[str, frozenset[str]] = {}


def _in_source_tree() -> bool:
    """True when this package is the repo's source folder, which never holds
    the compiled modules: Python put the current directory (the repo root)
    ahead of the installed package."""
    root = pathlib.Path(__file__).resolve().parents[1]
    return (root / "pyproject.toml").is_file() and (root / "ffi").is_dir()


def _load() -> None:
    for platform, (name, ffi_platform) in _MODULES.items():
        try:
            module = importlib.import_module(f"jax_mla.{name}")
        except ImportError as e:
            if platform == "cpu" and _in_source_tree():
                raise ImportError(
                    f"jax_mla was imported from its source tree "
                    f"({pathlib.Path(__file__).resolve().parent}), which has no compiled modules. "
                    "Install it (`pip install .`) and run Python with -P (`python -P -m jax_mla`) "
                    "or from another directory, so the installed package is imported"
                ) from e
            _load_errors[platform] = f"jax_mla.{name} did not load ({e})"
            continue
        registrations = module.registrations()
        for target, capsule in registrations.items():
            jax.ffi.register_ffi_target(target, capsule, platform=ffi_platform)
        _loaded[platform] = module
        _targets[platform] = frozenset(registrations)
    isa_error = cpu_isa_error()
    if isa_error:
        warnings.warn(
            f"jax_mla: {isa_error}; the CPU kernels will refuse to run until "
            "JAX_MLA_CPU_ISA is fixed",
            RuntimeWarning,
            stacklevel=2,
        )


def cpu_isa_error() -> str | None:
    """Why the CPU kernels cannot run with this process's JAX_MLA_CPU_ISA, or
    None (also None when the CPU module did not load)."""
    cpu = _loaded.get("cpu")
    if cpu is None:
        return None
    try:
        cpu.isa()
    except ValueError as e:
        return str(e)
    return None


_load()


def module(platform: str):
    """The native module for a JAX platform ("cpu" or "gpu"), or None."""
    return _loaded.get(_platform_key(platform))


def has_target(platform: str, target: str) -> bool:
    return target in _targets.get(_platform_key(platform), ())


def why_missing(platform: str, target: str) -> str:
    key = _platform_key(platform)
    if key in _load_errors:
        return _load_errors[key]
    if key not in _MODULES:
        return f"jax_mla has no native backend for platform {platform!r}"
    if key not in _loaded:
        return f"jax_mla.{_MODULES[key][0]} was not built"
    return f"the {key} module does not implement {target} yet"


def _platform_key(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda", "rocm", "CUDA") else platform


def backends() -> dict[str, dict]:
    """Which native modules loaded, and what they report about themselves."""
    info: dict = {}
    cpu = _loaded.get("cpu")
    # Read the switch once, so the ISA and the error below describe the same setting.
    isa_error = cpu_isa_error()
    info["cpu"] = {
        "loaded": cpu is not None,
        "targets": sorted(_targets.get("cpu", ())),
        # "error: ..." when JAX_MLA_CPU_ISA names a path this CPU cannot run.
        "isa": (f"error: {isa_error}" if isa_error else cpu.isa()) if cpu else None,
        "built_isas": cpu.built_isas().split(",") if cpu else [],
        "supported_isas": cpu.supported_isas().split(",") if cpu else [],
        "error": _load_errors.get("cpu") or isa_error,
    }
    cuda = _loaded.get("gpu")
    info["cuda"] = {
        "loaded": cuda is not None,
        "targets": sorted(_targets.get("gpu", ())),
        "runtime_version": cuda.runtime_version() if cuda else None,
        "error": _load_errors.get("gpu"),
    }
    return info
