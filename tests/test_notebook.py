"""notebooks/vae_cifar10.ipynb runs headless through papermill, as its intro says.

The notebook runs in a real ipykernel subprocess (the `python3` kernelspec, which jupyter_client
starts with this interpreter), so the data cache and thread count are passed through the
environment. Skipped unless the `notebook` extra is installed.
"""

import json
from pathlib import Path

import pytest

import resvae

papermill = pytest.importorskip(
    "papermill", reason="papermill not installed (pip install -e '.[notebook]')")
pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install -e '.[notebook]')")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "vae_cifar10.ipynb"


def outputs(nb, cell_index):
    return nb["cells"][cell_index].get("outputs", [])


def test_committed_notebook_is_clean():
    """No outputs or execution counts in the repository copy; a `parameters` cell; python3."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert [c for c in code if "parameters" in c["metadata"].get("tags", [])]


def test_notebook_defaults_run(tmp_path, clean_env, monkeypatch):
    """The parameters as committed (preset cpu, CIFAR-10, download on), only the budget tiny.

    The kernel finds a small CIFAR-10 in the real python-batches format through RESVAE_DATA_DIR,
    as a user's machine would find the real one, so the download is never attempted.
    """
    from test_data import _write_cifar_dir

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RESVAE_DATA_DIR", str(_write_cifar_dir(tmp_path / "data")))
    nb = papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), parameters=dict(budget="5s"),
        kernel_name="python3", progress_bar=False, cwd=str(tmp_path), execution_timeout=300)
    assert not any(o.get("output_type") == "error" for c in nb["cells"]
                   for o in c.get("outputs", []))
    run = tmp_path / "runs" / "notebook-cpu-40"  # the default out: the preset and its depth
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"]["arch"], cfg["model"]["depth"], cfg["train"]["budget"]) == ("hier", 40, "5s")
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "budget"


def test_notebook_runs_headless(tmp_path, clean_env, monkeypatch):
    # clean_env: the caller's RESVAE_* settings must not reach the kernel
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run, executed = tmp_path / "run", tmp_path / "executed.ipynb"

    nb = papermill.execute_notebook(
        str(NOTEBOOK), str(executed),
        parameters=dict(preset="tiny", dataset="shapes", depth=20, budget="2m", max_epochs=1,
                        subset=64, out=str(run)),
        kernel_name="python3", progress_bar=False, cwd=str(tmp_path), execution_timeout=300)

    # papermill raises PapermillExecutionError on a failing cell; check the record too
    assert not any(o.get("output_type") == "error" for c in nb["cells"]
                   for o in c.get("outputs", []))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["stop_reason"] == "max_epochs"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert json.loads((run / "config.json").read_text())["data"]["subset"] == 64

    # the kernel imported this checkout's resvae, not some other installation
    printed = "".join(o.get("text", "") for c in nb["cells"] for o in c.get("outputs", [])
                      if o.get("output_type") == "stream")
    line = next(x for x in printed.splitlines() if x.startswith("resvae "))
    assert Path(line.partition(": ")[2]).resolve() == Path(resvae.__file__).resolve().parent

    # the curves and the two grids were shown inline
    images = [o for c in nb["cells"] for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3
