"""The CrossGET notebook runs top to bottom and shows what it promises; it matches its generator."""
from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAME = "crossget_madtp.ipynb"


@pytest.mark.slow
def test_crossget_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOKS / NAME, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    # ViT-B/16 with the cross token: 198 tokens, r_image=16 capped at (N - 2) // 2 in the last block
    assert "[198, 182, 166, 150, 134, 118, 102, 86, 70, 54, 38, 22]" in text
    assert "text tokens entering each block: [78, 72, 66, 60, 54, 48, 42, 36, 30, 24, 18, 12]" in text
    assert "groups after 12 blocks: [" in text
    assert "r_image=16, r_text=6:" in text and "x the baseline" in text
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 1


def test_crossget_notebook_matches_its_generator():
    committed = nbformat.read(NOTEBOOKS / NAME, as_version=4)
    cwd = os.getcwd()
    written = {}
    real_write = nbformat.write
    try:
        os.chdir(NOTEBOOKS.parent)
        nbformat.write = lambda nb, path: written.setdefault("nb", nb)
        runpy.run_path(str(NOTEBOOKS / "make_crossget_madtp.py"))
    finally:
        nbformat.write = real_write
        os.chdir(cwd)
    assert [c.source for c in written["nb"].cells] == [c.source for c in committed.cells]
