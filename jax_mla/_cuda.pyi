def registrations() -> dict[str, object]:
    """FFI handler capsules by target name, for platform "CUDA" (none yet)."""

def sm_count(device: int = 0) -> int:
    """Multiprocessors of a CUDA device, 0 when there is none."""

def runtime_version() -> int:
    """The CUDA runtime version the module was built against (e.g. 13000)."""
