"""Every notebook in notebooks/ runs top to bottom with the fast setting (PPVAE_NOTEBOOK_FAST=1:
fewer epochs, samples and draws) and fails on any cell error; the notebooks end with cells that
assert their numbers. The numbered notebooks (``NN_name.ipynb``) are the published ones: they are
committed executed, in order, with their outputs (figures included), so a code host shows them."""

import json
import re

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PUBLISHED = [p for p in NOTEBOOKS if re.fullmatch(r"\d\d_.+\.ipynb", p.name)]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="the dev extra (nbclient) is not installed")
    import nbformat

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PPVAE_NOTEBOOK_FAST", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    assert not list(tmp_path.iterdir())  # a notebook writes nothing beside itself


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_published_notebook_is_committed_with_its_outputs(path):
    notebook = json.loads(path.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"])]
    counts = [cell.get("execution_count") for cell in cells]
    assert None not in counts, f"{path.name}: cells not executed: run it and save the outputs"
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not run top to bottom"
    outputs = [output for cell in cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no figure"
    # the published outputs come from the full setting (notebooks print "fast setting" in it)
    streams = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    assert "fast setting" not in streams, f"{path.name}: outputs of the fast setting committed"
