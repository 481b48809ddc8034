"""weaktr.grid on a REAL run notebook: nbs/runs/pseudo_labels.ipynb over a 2x1 grid (threshold x crf).

One point is valid, the other has a bad parameter value (threshold 1.5, refused by PseudoCfg in the run notebook's
config cell): the bad point is recorded with its message and cell, the good one finishes, the results table and plot
are written; then the CLI re-runs the finished point and skips it, and runs the documented `crf=none` point (a
string, not Python None). The CAMs come from a smoke `generate_cams` (tiny random model) on an 8-image synthetic set
made in the test's temporary folder.
"""
import json
import os
import subprocess
import sys

import pytest

from weaktr.core import REPO_ROOT
from weaktr.grid import run_grid

NB = REPO_ROOT / "nbs" / "runs" / "pseudo_labels.ipynb"


@pytest.fixture(scope="module")
def cams(tmp_path_factory):
    if not NB.is_file(): pytest.skip(f"run notebook not found: {NB}")
    from weaktr.camgen import CamGenCfg, generate_cams
    from weaktr.synth import make_synthetic
    tmp = tmp_path_factory.mktemp("grid")
    root = make_synthetic(tmp / "synth", n_train=8, n_val=2, size=64, num_classes=6, seed=0)
    s = generate_cams(CamGenCfg(run_dir=str(tmp / "cams"), checkpoint="", data="synthetic", data_root=str(root),
                                split="train", scales=(1.0,), amp="off", device="cpu", smoke=True))
    assert s["n_generated"] == 8
    return tmp, root


def test_grid_on_pseudo_labels_notebook(cams):
    tmp, root = cams
    out = tmp / "grid"
    base = dict(cams_dir=str(tmp / "cams"), data="synthetic", data_root=str(root), split="train",
                threshold_mode="fixed",
                workers=1)
    res = run_grid(NB, {"threshold": [0.4, 1.5], "crf": ["voc"]}, base, out, workers=2)
    assert res.column("status") == ["done", "failed"], res.to_markdown()
    good, bad = res
    # the good point: its own run folder, executed notebook, pseudo labels, metrics in the table
    assert good["name"] == "threshold-0.4__crf-voc" and good["run_dir"] == str(out / "threshold-0.4__crf-voc")
    assert (out / good["name"] / "pseudo_labels.ipynb").is_file()
    assert len(list((out / good["name"] / "pseudo").glob("*.png"))) == 8
    summary = json.loads((out / good["name"] / "summary.json").read_text())
    assert good["threshold"] == 0.4 and summary["threshold"] == 0.4                 # the axis value reached the stage
    assert good["summary.threshold"] == 0.4 and good["miou"] == summary["miou"] and good["n_written"] == 8
    assert res.metric == "miou"
    # the bad point: recorded with the stage's message, the failing cell and the executed notebook
    assert "PseudoCfg.threshold=1.5" in bad["error"] and bad["error_type"] == "ValueError", bad
    nb = json.loads((out / bad["name"] / "pseudo_labels.ipynb").read_text())
    assert bad["error_cell"] is not None
    assert "cfg_from_flat(PseudoCfg" in "".join(nb["cells"][bad["error_cell"]]["source"])
    assert not (out / bad["name"] / "summary.json").exists()
    # the table: CSV + markdown + plot
    for f in ("results.csv", "results.md", "results.png", "results.json"): assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert "| threshold | crf | status | miou |" in md and "PseudoCfg.threshold=1.5" in md
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("threshold,crf,status,")

    # the CLI re-runs the finished point: skipped (the notebook is not executed again); the documented crf "none" stays
    # a string (issue 16 item 19: it became Python None and every CRF-off point failed) and that point runs
    mtime = (out / good["name"] / "pseudo_labels.ipynb").stat().st_mtime
    cmd = [sys.executable, "-m", "weaktr.grid", str(NB), "--grid", "threshold=0.4", "--grid", "crf=voc,none", "--out",
           str(out),
           "--base", f"cams_dir={tmp / 'cams'}", "--base", "data=synthetic", "--base", f"data_root={root}",
           "--base", "split=train", "--base", "threshold_mode=fixed", "--base", "workers=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 already finished, 1 to run" in r.stdout and "| 0.4 | voc | skipped |" in r.stdout, r.stdout
    assert "| 0.4 | none | done |" in r.stdout, r.stdout
    assert json.loads((out / "threshold-0.4__crf-none" / "summary.json").read_text())["n_written"] == 8
    assert "without encryption" not in r.stdout + r.stderr                          # issue 16 item 20
    assert (out / good["name"] / "pseudo_labels.ipynb").stat().st_mtime == mtime


def test_grid_rejects_unknown_parameters():
    if not NB.is_file(): pytest.skip(f"run notebook not found: {NB}")
    with pytest.raises(ValueError, match=r"grid parameter\(s\) \['thresh'\] not in the parameters cell"):
        run_grid(NB, {"thresh": [0.4]}, out_dir="/nonexistent/never-created")


def test_check_parameters_command(capsys, monkeypatch):
    "`python -m weaktr.grid check-parameters`: 0 when every run notebook agrees with its config, 1 naming a drift."
    from weaktr import grid
    assert grid.main(["check-parameters"]) == 0
    assert "parameters cells agree with their configs" in capsys.readouterr().out
    monkeypatch.setitem(grid.REGISTRY, "train_cam",
                        grid.dataclasses.replace(grid.REGISTRY["train_cam"], demo="weaktr.train_seg:SEG_TRAIN_DEMO"))
    assert grid.main(["check-parameters", "train_cam"]) == 1
    out = capsys.readouterr().out
    assert "weaktr.train_seg:SEG_TRAIN_DEMO: 'crop_size' is not a CamTrainCfg field" in out, out
    # a default the wrong preset does not explain: the cell's value against the class default
    assert "train_cam.ipynb: cam_t_range = (0.05, 0.95, 0.01), expected (0.4, 0.6, 0.01) (CamTrainCfg's default)" in out
