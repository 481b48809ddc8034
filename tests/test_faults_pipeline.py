"""Fault injection for the stage runner, the pipeline and the grid (issue 16 items 1, 5, 14, 18, 19, 20; issue 11's
stage registry, one `parse_value` and mIoU stored as a fraction). Each test failed on the code before the fix. Fast: toy
notebooks (a few seconds of kernel start-up each) and no training."""
import ast
import json
from pathlib import Path

import pytest

from weaktr.core import REPO_ROOT

RUN_NBS = sorted((REPO_ROOT / "nbs" / "runs").glob("*.ipynb"))


def _parameters_source(nb: Path) -> str:
    cells = json.loads(nb.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("nb", RUN_NBS, ids=lambda p: p.stem)
def test_papermill_inspection_sees_every_parameter(nb):
    "Item 18: papermill 2.7 drops a parameter whose comment holds '=' (a spurious 'unknown parameter' warning)."
    import papermill as pm
    declared = [n.target.id for n in ast.parse(_parameters_source(nb)).body if isinstance(n, ast.AnnAssign)]
    seen = pm.inspect_notebook(str(nb))
    assert declared and [k for k in declared
                         if k not in seen] == [], f"{nb.name}: papermill does not see these parameters"


# --------------------------------------------------------------------------------------------------------------------
# toy stages: a registered spec around a small notebook (kernel start-up only, no training)
import dataclasses  # noqa: E402


@dataclasses.dataclass
class ToyCfg:
    "The toy stage's config: what `validate_params` builds from the notebook defaults + the parameters."
    run_dir: str = "runs/toy"
    x: float = 1.0
    mode: str = "a"
    progress: bool = True


def _resuming_notebook(path: Path) -> Path:
    "Like the real stages, it resumes from its own outputs: result.txt is computed once per folder, then reused."
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('run_dir: str = "runs/toy"  # output folder\nx: float = 1.0  # must be >= 0\n'
                                          'mode: str = "a"  # "a" or "b"\nprogress: bool = True  # result-neutral',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('import json, pathlib\n'
                                          'if x < 0: raise ValueError(f"x must be >= 0, got {x}")'),
                nbformat.v4.new_code_cell('out = pathlib.Path(run_dir); out.mkdir(parents=True, exist_ok=True)\nres = '
                                          'out / "result.txt"\ncomputed = not res.exists()\nif computed: '
                                          'res.write_text(str(x * 2))\n(out / '
                                          '"summary.json").write_text(json.dumps(dict(computed=computed, '
                                          'value=float(res.read_text()))))')]
    for i, c in enumerate(nb.cells): c["id"] = f"cell{i}"
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    from weaktr.grid import REGISTRY, StageSpec
    nb = _resuming_notebook(tmp_path / "toy.ipynb")
    spec = StageSpec("toy", str(nb), ToyCfg, neutral=("progress",), title="toy stage")
    monkeypatch.setitem(REGISTRY, "toy", spec)
    from weaktr.pipeline import Stage, stage_fingerprint

    def make(**params):
        st = Stage("toy", "toy", {"run_dir": str(tmp_path / "run" / "01_toy"), **params}, index=1)
        return st, stage_fingerprint(st, {})
    return make, tmp_path / "run"


def _run(stage, run_dir, fp, **kw):
    from weaktr.pipeline import run_stage
    return run_stage(stage, run_dir, fp, log=lambda *a: None, stream=False, **kw)


def test_bad_value_leaves_finished_stage_untouched(toy_stage):
    "Item 1: a bad value is refused before the stage folder is touched (the old runner emptied it first)."
    make, run_dir = toy_stage
    st, fp = make(x=2.0)
    assert _run(st, run_dir, fp)["status"] == "ran"
    sdir = run_dir / "01_toy"
    before = {p.name: p.read_bytes() for p in sdir.iterdir() if p.is_file()}
    bad, fp_bad = make(x="abc")
    with pytest.raises(ValueError, match=r"x='abc': expected float"):
        _run(bad, run_dir, fp_bad)
    assert {p.name: p.read_bytes() for p in sdir.iterdir() if p.is_file()} == before


def test_failed_run_puts_the_previous_result_back(toy_stage):
    "Item 1, second half: a value the notebook itself refuses; the finished result comes back, the failed run is kept."
    from weaktr.pipeline import StageFailed, is_done
    make, run_dir = toy_stage
    st, fp = make(x=2.0)
    _run(st, run_dir, fp)
    bad, fp_bad = make(x=-1.0)                            # a float (passes validation), refused in the notebook
    with pytest.raises(StageFailed, match=r"x must be >= 0") as e:
        _run(bad, run_dir, fp_bad)
    assert e.value.notebook == run_dir / "01_toy.failed" / "toy.ipynb" and e.value.notebook.is_file()
    assert is_done(run_dir / "01_toy", fp) and (run_dir / "01_toy" / "result.txt").read_text() == "4.0"
    assert _run(st, run_dir, fp)["status"] == "skipped"


def test_force_recomputes(toy_stage):
    "Item 5: --force re-ran the notebook in the old folder, where the stage resumed and recomputed nothing."
    make, run_dir = toy_stage
    st, fp = make(x=2.0)
    assert _run(st, run_dir, fp)["summary"]["computed"] is True
    (run_dir / "01_toy" / "result.txt").write_text("999")          # a stale output the stage would resume from
    r = _run(st, run_dir, fp, force=True)
    assert r["status"] == "ran" and r["summary"] == {"computed": True, "value": 4.0}
    assert not (run_dir / "01_toy.previous").exists()        # the set-aside result is deleted once the new one finished


def test_killed_run_then_old_parameters_restores_previous(toy_stage):
    "A run killed after setting the old result aside: asking for the old parameters again puts it back (nothing lost)."
    make, run_dir = toy_stage
    st, fp = make(x=2.0)
    _run(st, run_dir, fp)
    (run_dir / "01_toy").rename(run_dir / "01_toy.previous")       # what a kill -9 during the next run leaves behind
    (run_dir / "01_toy").mkdir()
    (run_dir / "01_toy" / "pipeline.json").write_text(json.dumps(dict(status="running", fingerprint="other")))
    assert _run(st, run_dir, fp)["status"] == "skipped"
    assert (run_dir / "01_toy" / "result.txt").read_text() == "4.0"


def test_neutral_parameters_keep_the_fingerprint(toy_stage):
    "Item 14: progress, n_fig, CRF/loader worker counts re-ran every downstream stage."
    from weaktr.pipeline import Stage, stage_fingerprint
    make, _ = toy_stage
    assert make(x=2.0, progress=True)[1] == make(x=2.0, progress=False)[1] != make(x=3.0)[1]
    fp = lambda kind, **p: stage_fingerprint(Stage(kind, kind, dict(run_dir="/r", **p)), {})
    assert fp("evaluate", n_fig=6, progress=True) == fp("evaluate", n_fig=1, progress=False)
    assert fp("pseudo_labels", workers=1) == fp("pseudo_labels", workers=4)
    assert fp("gen_cams", num_workers=0) == fp("gen_cams", num_workers=2)
    assert fp("train_cam", progress=True, log_every=1) == fp("train_cam", progress=False, log_every=50)
    assert fp("train_cam", num_workers=0) != fp("train_cam", num_workers=2)     # augmentation streams differ per worker
    assert fp("evaluate", crf=True) != fp("evaluate", crf=False)


def test_grid_point_identity_ignores_neutral_parameters(tmp_path):
    "Item 14 for grids: a finished point is not re-run because the CRF worker count changed."
    from weaktr.grid import GRID_POINT, point_finished, stage_notebook
    nb = stage_notebook("pseudo_labels")
    p = dict(run_dir=str(tmp_path), threshold=0.4, workers=1)
    (tmp_path / "summary.json").write_text(json.dumps(dict(finished=True)))
    (tmp_path / GRID_POINT).write_text(json.dumps(dict(notebook=nb.name, params=p, status="done")))
    assert point_finished(tmp_path, nb, {**p, "workers": 4})
    assert not point_finished(tmp_path, nb, {**p, "threshold": 0.5})


# --------------------------------------------------------------------------------------------------------------------
def test_grid_values_follow_the_declared_type():
    "Item 19: `--grid crf=voc,none` gave Python None for the documented string 'none'."
    from weaktr.grid import notebook_parameters, parse_assignment, stage_notebook
    types = notebook_parameters(stage_notebook("pseudo_labels"))
    assert parse_assignment("crf=voc,none", many=True, types=types) == ("crf", ["voc", "none"])
    assert parse_assignment("sweep_crf=TRUE", types=types) == ("sweep_crf", True)
    assert parse_assignment("threshold=0.4,1", many=True, types=types) == ("threshold", [0.4, 1.0])
    with pytest.raises(ValueError, match=r"workers='two': expected an int"):
        parse_assignment("workers=two", types=types)


def test_grid_cli_refuses_a_bad_value_before_running(tmp_path, capsys):
    "A value of the wrong declared type stops the grid CLI with one clear line (exit 2) before any point runs."
    from weaktr.grid import main, stage_notebook
    rc = main([str(stage_notebook("pseudo_labels")), "--grid", "workers=two", "--out", str(tmp_path / "g")])
    assert rc == 2 and "workers='two': expected an int" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_one_parse_value():
    "Issue 11: grid.py and pipeline.py had two public parse_value that disagreed on 'TRUE'."
    import weaktr.grid as grid
    import weaktr.pipeline as pipeline
    assert getattr(pipeline, "parse_value", grid.parse_value) is grid.parse_value
    assert "parse_value" not in pipeline.__all__
    assert grid.parse_value("TRUE") is True and grid.parse_value("TRUE", "bool") is True
    assert grid.parse_value("TRUE", "str") == "TRUE"


def test_one_registry_and_one_runner():
    "Issue 11: the pipeline, the grid and the presets share one stage registry and one papermill runner."
    import inspect
    import weaktr.grid as grid
    import weaktr.pipeline as pipeline
    assert list(grid.STAGES) == list(pipeline.MAIN_STAGES)
    assert all(grid.STAGES[n] is grid.REGISTRY[n] for n in grid.STAGES)
    for name in ("run_stage",):
        assert "execute_notebook" not in inspect.getsource(getattr(pipeline, name))
    assert "execute_notebook" not in inspect.getsource(grid.run_point)
    assert inspect.getsource(pipeline).count("execute_notebook") == 0
    assert inspect.getsource(grid).count("pm.execute_notebook(") == 1


def test_kernel_runs_without_the_tcp_warning(tmp_path, capfd):
    "Item 20: every kernel printed ipykernel's 'Kernel is running over TCP without encryption' into the user's log."
    from weaktr.grid import run_grid
    from weaktr.testing import toy_notebook
    nb = toy_notebook(tmp_path / "toy.ipynb")
    res = run_grid(nb, {"x": [1.0]}, out_dir=tmp_path / "grid", workers=1, verbose=False)
    assert res.column("status") == ["done"]
    out, err = capfd.readouterr()
    assert "without encryption" not in out + err, err[-2000:]


def test_miou_is_stored_as_a_fraction(tmp_path):
    """Issue 11: evaluation stored percent, other stages fractions, and pipeline._frac guessed which (a Phase-2 mIoU of
    0.5 % was reported as 50 %). Now every stored mIoU is a fraction; a percent-era evaluation is not reused."""
    import numpy as np
    from weaktr.evaluate import _scores
    from weaktr.grid import REGISTRY
    from weaktr.pipeline import Stage, collect_metrics
    s = _scores(np.array([[3, 1], [0, 4]]))                             # IoU 3/4 and 4/5, accuracy 7/8
    assert (s["miou"], s["pixel_acc"], s["per_class_iou"]) == (0.775, 0.875, [0.75, 0.8])
    (tmp_path / "05_evaluate").mkdir()
    (tmp_path / "05_evaluate" / "summary.json").write_text(json.dumps(dict(headline_miou=0.005, miou=0.0025)))
    m = collect_metrics(tmp_path, [Stage("evaluate", "evaluate", {}, index=5)])
    assert (m["seg_miou"], m["seg_miou_no_crf"]) == (0.005, 0.0025)
    assert REGISTRY["evaluate"].result_format == REGISTRY["train_seg"].result_format == 1   # part of the fingerprint


def test_runs_go_to_the_working_directory_or_weaktr_runs(tmp_path, monkeypatch):
    "Issue 11: the pipeline's runs go to ./runs of the working directory, or $WEAKTR_RUNS."
    from weaktr.pipeline import default_run_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WEAKTR_RUNS", raising=False)
    assert default_run_dir() == tmp_path / "runs" / "demo"
    monkeypatch.setenv("WEAKTR_RUNS", str(tmp_path / "elsewhere"))
    assert default_run_dir() == tmp_path / "elsewhere" / "demo"
