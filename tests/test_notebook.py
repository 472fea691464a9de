"""notebooks/quickstart.ipynb and notebooks/mbv2_search.ipynb run top to bottom at toy size
on the shared data.

The kernel is this interpreter: a kernel spec written for `sys.executable` (ipykernel's own
`write_kernel_spec`) is the only one the kernel manager sees, so a `python3` spec installed
elsewhere (user or system Jupyter directories) cannot pick another Python. A cell appended to
the executed copy checks it.

Slow: quickstart 51-75 s measured on 2 CPU cores shared with a benchmark (about 52 s of
CPU), almost all of it compiling the pieces of wrcor, synflow and jacob_cov (~140 XLA
compilations). mbv2_search at toy size scores the cost proxies (params, flops), which
compile nothing: a WRCor of a sampled MobileNetV2-space network compiles for 15-40 s (110 s
on a loaded machine) until that space's engine exists.
"""

import csv
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import GROUND_TRUTH, SAMPLE, require

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the skips)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"
COLUMNS = ["arch", "wrcor", "synflow", "jacob_cov", "vote(synflow,jacob_cov,wrcor)"]
TOY_ARCHS = 4


@pytest.mark.parametrize("name", ["quickstart.ipynb", "mbv2_search.ipynb"])
def test_committed_notebook_has_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def execute(path: Path, tmp_path: Path) -> nbformat.NotebookNode:
    """The notebook executed in a kernel of this interpreter (checked by an appended cell),
    in `tmp_path`; its parameters come from the environment."""
    kernels = tmp_path / "kernels"
    kernelspec.write_kernel_spec(kernels / "python3")
    manager = KernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(
        nbformat.v4.new_code_cell("import json, sys\nprint(json.dumps(sys.executable))")
    )
    client = nbclient.NotebookClient(
        notebook, km=manager, timeout=900, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    kernel_python = json.loads(notebook.cells[-1].outputs[0]["text"])
    assert os.path.samefile(kernel_python, sys.executable)
    return notebook


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WRCOR_NB_DATA", str(require(SAMPLE)))
    monkeypatch.setenv("WRCOR_NB_GROUND_TRUTH", str(require(GROUND_TRUTH)))
    monkeypatch.setenv("WRCOR_NB_ARCHS", str(TOY_ARCHS))
    monkeypatch.setenv("WRCOR_NB_BATCH", "16")
    monkeypatch.setenv("WRCOR_NB_BOOTSTRAP", "50")
    monkeypatch.setenv("WRCOR_NB_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = execute(NOTEBOOK, tmp_path)

    with (out / "scores.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert len(rows) == TOY_ARCHS
    votes = sorted(float(row[COLUMNS[-1]]) for row in rows)
    assert votes == list(range(TOY_ARCHS))  # filled: each arch's position in the vote order
    assert (out / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    displayed = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(displayed) == 1


@pytest.mark.slow
def test_mbv2_search_notebook_runs(tmp_path, monkeypatch):
    """Toy size: 3 sampled networks and a 12-evaluation search with the cost proxies."""
    out = tmp_path / "out"
    monkeypatch.setenv("WRCOR_NB_DATASET", "cifar10")
    monkeypatch.setenv("WRCOR_NB_DATA", str(require(SAMPLE)))
    monkeypatch.setenv("WRCOR_NB_PROXIES", "params,flops")
    monkeypatch.setenv("WRCOR_NB_ARCHS", "3")
    monkeypatch.setenv("WRCOR_NB_BUDGET", "12")
    monkeypatch.setenv("WRCOR_NB_BATCH", "8")
    monkeypatch.setenv("WRCOR_NB_OUT", str(out))
    notebook = execute(NOTEBOOKS / "mbv2_search.ipynb", tmp_path)

    with (out / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and sorted(float(r["vote(params,flops)"]) for r in rows) == [0, 1, 2]
    result = json.loads((out / "search" / "result.json").read_text())
    assert result["evaluations"] == 12 and result["flops"] <= 600_000_000
    assert result["landmarks"]["EA_our_vote_600M"]["rank"] >= 1
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "JAX devices:" in text and result["best_arch"] in text
    assert "vote rank" in text and "outside: 1,658,275,280 FLOPs" in text
