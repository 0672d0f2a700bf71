"""The notebooks run top to bottom (one training epoch) and show what they promise."""

from __future__ import annotations

import os

import pytest
from repo import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = ROOT / "notebooks"


def _outputs(nb, kind: str) -> list:
    return [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == kind or kind in out.get("data", {})
    ]


@pytest.mark.slow
def test_tome_digits_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLEFF_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("VLEFF_NOTEBOOK_STEPS", "8")  # the ToMe warm-up still reaches r=4 by the last step
    monkeypatch.setenv("VLEFF_NOTEBOOK_REPEATS", "1")
    nb = nbformat.read(NOTEBOOKS / "tome_digits.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "".join(out.get("text", "") for out in _outputs(nb, "stream"))
    assert "validation accuracy with ToMe:" in text
    # tokens entering the 6 blocks of the 65-token digits ViT with r=4
    assert "[65, 61, 57, 53, 49, 45]" in text
    # three figures (digits groups, photo groups, results plot) and the table rows
    assert len(_outputs(nb, "image/png")) >= 3
    assert "baseline" in text and "tome(r=6) off the shelf" in text
    assert (tmp_path / "tome_digits_results.png").stat().st_size > 0


def test_notebook_matches_its_generator():
    """notebooks/make_tome_digits.py writes the notebook; the two must not drift apart."""
    import runpy

    nb_path = NOTEBOOKS / "tome_digits.ipynb"
    committed = nbformat.read(nb_path, as_version=4)
    cwd = os.getcwd()
    try:
        os.chdir(NOTEBOOKS.parent)
        written = {}
        real_write = nbformat.write
        nbformat.write = lambda nb, path: written.setdefault("nb", nb)
        try:
            runpy.run_path(str(NOTEBOOKS / "make_tome_digits.py"))
        finally:
            nbformat.write = real_write
    finally:
        os.chdir(cwd)
    assert [c.source for c in written["nb"].cells] == [c.source for c in committed.cells]
