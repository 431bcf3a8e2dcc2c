"""The notebooks execute top to bottom (small sizes: FLAGJAX_NOTEBOOK_QUICK=1)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["solver_behaviour", "results"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("FLAGJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("FLAGJAX_RESULTS", str(NB.parent / "experiments" / "results"))
    monkeypatch.setenv("PYTHONPATH", str(NB.parent))  # the kernel imports flagjax from this checkout
    nb = nbformat.read(NB / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NB)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
