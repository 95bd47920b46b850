"""Executes every notebook in notebooks/ with nbclient; a cell that raises fails the test.

Each notebook runs in a fresh kernel from the notebooks/ directory, with a time limit per
cell; two kernels run at a time (a notebook's cells mostly compile, on one core). The
kernel inherits this process's environment (conftest.py sets 8 simulated CPU
devices; the notebooks' first cell sets them too when run by hand). Notebooks are stored
without outputs, which is checked as well.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart", "compressor_zoo", "greedy_vs_random", "staleness_and_theory"]
CELL_TIMEOUT_S = 300


def execute(nb: nbformat.NotebookNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs ``nb`` in place; raises ``CellExecutionError`` on the first failing cell."""
    # Multi-threaded OpenBLAS spin-waits badly on small shared CI machines.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()


@pytest.fixture(scope="module")
def executed() -> dict[str, tuple[nbformat.NotebookNode, BaseException | None]]:
    """Every notebook executed, two at a time: name -> (notebook, what it raised)."""
    def run(name, mp):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        try:
            execute(nb, mp)
        except Exception as e:  # noqa: BLE001 - reported by the notebook's own test
            return nb, e
        return nb, None

    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(NAMES, pool.map(lambda n: run(n, mp), NAMES), strict=True))


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])
    assert "xla_force_host_platform_device_count" in nb.cells[1].source, (
        "the first code cell must set XLA_FLAGS for 8 devices")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, executed):
    nb, raised = executed[name]
    if raised is not None:
        raise raised
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors


@pytest.mark.slow
def test_a_raising_cell_fails_the_run(monkeypatch):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('boom')"),
        nbformat.v4.new_code_cell("y = 2"),
    ])
    with pytest.raises(CellExecutionError, match="boom"):
        execute(nb, monkeypatch)
