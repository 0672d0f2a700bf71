"""The CrossGET/MADTP notebook runs top to bottom and shows what it promises; it matches its generator."""

from __future__ import annotations

import ast
import os
import re
import runpy

import pytest
from repo import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = ROOT / "notebooks"
NAME = "crossget_madtp.ipynb"


@pytest.mark.slow
def test_crossget_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOKS / NAME, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    # ViT-B/16 with the cross token: 198 tokens, r_image=16 capped at (N - 2) // 2 in the last block
    assert "[198, 182, 166, 150, 134, 118, 102, 86, 70, 54, 38, 22]" in text
    assert "text tokens entering each block: [78, 72, 66, 60, 54, 48, 42, 36, 30, 24, 18, 12]" in text
    assert "groups after 12 blocks: [" in text
    assert "r_image=16, r_text=6:" in text and "x the baseline" in text
    # MADTP on the tiny digits CLIP: 32 px / patch 4 = 64 patches + cls, 16 text positions entering
    # block 0; each sample's count never grows and pruning happens; τ met the image FLOPs target
    ratio = float(re.search(r"MADTP tau=\S+: ([0-9.]+) x the image tower FLOPs", text).group(1))
    assert abs(ratio - 0.5) <= 0.03 * 0.5
    for tower, first in (("image", 65), ("text", 16)):
        line = re.search(rf"MADTP {tower} tokens entering each block, per sample: (.*)", text).group(1)
        rows = ast.literal_eval(line)
        assert len(rows) == 8 and all(len(r) == 4 and r[0] == first for r in rows)
        assert all(a >= b for r in rows for a, b in zip(r, r[1:]))
        assert all(r[-1] < first for r in rows)
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 2


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
