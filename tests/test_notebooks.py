"""The notebooks in notebooks/ run top to bottom (with JAX_MLA_NOTEBOOK_SMALL=1:
the same cells on small shapes), so they never rot. The runner (nbclient,
nbformat, ipykernel) and matplotlib are in the `test` extra; the GPU machine
lacks them, so they are imported with importorskip."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "benchmark.ipynb",
        "deepseek_layer.ipynb",
        "quickstart.ipynb",
        "training.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("JAX_MLA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    # Run from notebooks/ (no jax_mla/ source folder there to shadow the installed package).
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_its_outputs(path):
    """A reader on GitHub sees what the cells print: every code cell of the
    committed file ran, in order, and the file holds no error output."""
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts}"
    assert any(cell.get("outputs") for cell in code), f"{path.name} has no saved outputs"
    errors = [
        out for cell in code for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert not errors, errors
