"""The notebooks in notebooks/: each runs top to bottom headless on the demo data, and none is committed with outputs.

Every notebook is executed with nbclient in a temporary folder (its working directory, and TMPDIR so the
notebook's temporary work folder lands there too), with the "python3" kernel of the environment running pytest.
A failing cell fails the test with that cell's source and traceback; the executed copy is kept beside it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
# the longer ones (more than ~20 s on a 2-core CPU): they train models
SLOW = {"07_loso_training", "08_stacking", "09_evaluation_and_report"}
# real-data runs of the notebooks that take well under a minute on the HER2ST file
REAL_DATA_FAST = ("01_stain_normalisation", "03_spot_realignment")

nbformat = pytest.importorskip("nbformat", reason="nbformat is part of the 'test' extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is part of the 'test' extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel is part of the 'test' extra: pip install -e '.[test]'")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in IPython tracebacks
# Injected as the first cell of the executed copy: the kernel must be this environment with this repo's hevisum.
_PROBE = "import json as _j, sys as _s, hevisum as _h\nprint(_j.dumps({'python': _s.executable, 'hevisum': _h.__file__}))"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parameters_index(nb) -> int:
    """Index of the cell tagged 'parameters' (the one holding DATA)."""
    for i, cell in enumerate(nb.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return i
    raise AssertionError("no cell tagged 'parameters'")


def _use_this_python_as_kernel(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make "python3" mean this Python: a kernel spec in a folder searched before the user's own, and no
    IPython profile of the user's (its startup files could change what the notebooks see)."""
    spec_dir = folder / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (hevisum tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(folder))
    monkeypatch.setenv("IPYTHONDIR", str(folder / "ipython"))


def execute_notebook(path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch, data: Path | None = None):
    """Run a copy of the notebook at ``path`` with cwd ``workdir``; return the executed notebook.

    ``data``: injected as ``DATA = "<path>"`` in a cell right after the parameters cell (papermill's way).
    """
    nb = nbformat.read(path, as_version=4)
    if data is not None:
        nb.cells.insert(_parameters_index(nb) + 1, nbformat.v4.new_code_cell(f"DATA = {str(data)!r}"))
    nb.cells.insert(0, nbformat.v4.new_code_cell(_PROBE))
    # the notebook's tempfile.mkdtemp() work folder goes under the test's folder, cleaned up by pytest
    monkeypatch.setenv("TMPDIR", str(workdir))
    _use_this_python_as_kernel(workdir / "jupyter", monkeypatch)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    executed = workdir / f"executed-{path.name}"
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        failure = f"{path.name}: a cell raised (executed copy: {executed})\n{_ANSI.sub('', str(err))}"
    except nbclient.exceptions.CellTimeoutError as err:
        failure = f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S} s (executed copy: {executed})\n{err}"
    nbformat.write(nb, executed)
    if failure:
        pytest.fail(failure, pytrace=False)  # outside the except block: the message once, without a chained trace
    return nb


def _check_kernel(nb) -> None:
    """The injected probe cell: the kernel's Python is this one's, and hevisum is imported from this repo."""
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("output_type") == "stream")
    info = json.loads(text.strip().splitlines()[-1])
    assert Path(info["hevisum"]).resolve().is_relative_to(REPO / "src"), info
    assert Path(info["python"]).resolve() == Path(sys.executable).resolve(), info


def _errors(nb) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _listing(folder: Path) -> set[str]:
    """Names in ``folder`` (JupyterLab's checkpoints aside)."""
    return {p.name for p in folder.iterdir() if p.name != ".ipynb_checkpoints"}


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


# ------------------------------------------------------------------------------------------ committed files


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    # 10_python_api is written against the public API alone and executed by tests/test_api.py
    expected = set(_load_build_module().NOTEBOOKS) | {"10_python_api"}
    assert names == expected, f"notebooks on disk {sorted(names)} differ from notebooks/_build.py {sorted(expected)}"
    assert len(names) == 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path):
    """No outputs, no execution counts, the python3 kernel, and a DATA = None parameters cell first."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"{path.name}: cells {with_outputs} carry outputs or execution counts; clear them " \
                             "(or rebuild with python notebooks/_build.py)"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    assert [line for line in first_code.source.splitlines() if not line.startswith("#")] == ["DATA = None"]


def test_notebooks_match_build_script():
    """The committed notebooks are exactly what notebooks/_build.py writes (edit the script, then rebuild)."""
    build = _load_build_module()
    stale = [name for name in build.NOTEBOOKS
             if (NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8") != build.render(name)]
    assert not stale, f"{stale} differ from notebooks/_build.py; run: python notebooks/_build.py"


# ------------------------------------------------------------------------------------------ execution


def _marks(path: Path):
    return [pytest.mark.slow] if path.stem in SLOW else []


# 10_python_api is executed by tests/test_api.py
@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=_marks(p)) for p in NOTEBOOKS
                                  if p.stem != "10_python_api"])
def test_notebook_runs_on_demo_data(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    before = _listing(NOTEBOOK_DIR)
    nb = execute_notebook(path, tmp_path, monkeypatch)
    _check_kernel(nb)
    assert not _errors(nb)
    assert _images(nb) >= 1, f"{path.name} drew no figure"
    # nothing written beside the notebooks: work folders go to a temporary folder
    assert _listing(NOTEBOOK_DIR) - before == set()


@pytest.mark.shared
@pytest.mark.parametrize("name", REAL_DATA_FAST)
def test_notebook_runs_on_real_data(name: str, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    h5 = shared_data / "challenge" / "her2st.h5"
    if not h5.is_file():
        pytest.skip(f"{h5} not found")
    nb = execute_notebook(NOTEBOOK_DIR / f"{name}.ipynb", tmp_path, monkeypatch, data=h5)
    assert not _errors(nb)
    # the slide table names the real slides, not the demo's
    text = json.dumps([o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])])
    assert "C2" in text and "S_1" not in text


def test_build_check_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`_build.py --check` fails on a notebook that differs from the source and passes once rebuilt."""
    build = _load_build_module()
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.main([]) == 0
    assert build.main(["--check"]) == 0
    target = tmp_path / "05_rank_transform.ipynb"
    nb = json.loads(target.read_text())
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "stale\n"}]
    target.write_text(json.dumps(nb))
    assert build.main(["--check"]) == 1
    assert build.main([]) == 0 and build.main(["--check"]) == 0
