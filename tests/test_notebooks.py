"""Every tutorial in notebooks/ runs top to bottom, twice in one kernel, and is
stored with the outputs of one run."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_twice(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    # Run every cell, then every cell again: notebook users re-run cells.
    notebook.cells = notebook.cells + [nbformat.from_dict(c) for c in notebook.cells]
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_with_its_outputs(path):
    # The docs site and GitHub show the stored outputs; `make notebooks` stores
    # them from one run, top to bottom.
    notebook = nbformat.read(path, as_version=4)
    counts = [c.execution_count for c in notebook.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name} is stored without the outputs of one run, top to bottom "
        f"(execution counts {counts}): run `make notebooks`"
    )
