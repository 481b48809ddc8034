"""`python -m weaktr.pipeline --quick` end to end: every stage's executed notebook and summary, the re-run that skips
finished stages, re-runs that must not lose finished work (a bad `-p` value, a value the notebook refuses), neutral
parameters that re-run nothing, `--force`, and a failing stage that names its notebook and cell. (~5 min on a 2-core
CPU.)"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weaktr.core import REPO_ROOT
from weaktr.pipeline import MAIN_STAGES

STAGES = MAIN_STAGES + ("ablation",)   # the quick preset runs the ablation notebook without the extra trainings


def _run(args, timeout=420):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MPLBACKEND": "Agg"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "weaktr.pipeline", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r, time.time() - t0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipe") / "demo"
    r, dt = _run(["--quick", "--run-dir", str(run_dir), "--threads", "1"])
    assert r.returncode == 0, f"pipeline failed ({dt:.0f} s):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return run_dir, r, dt


def test_every_stage_ran_and_wrote_its_summary(quick_run):
    run_dir, r, dt = quick_run
    dirs = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert [d.name.split("_", 1)[1] for d in dirs] == list(STAGES)
    for d in dirs:
        st = json.loads((d / "pipeline.json").read_text())
        assert st["status"] == "done", (d, st)
        nb = d / st["notebook"]
        assert nb.is_file(), nb
        cells = json.loads(nb.read_text())["cells"]
        # executed by papermill
        assert any("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells)
        assert (d / "summary.json").is_file(), d
    s = json.loads((run_dir / "summary.json").read_text())
    for k in ("cls_map", "cam_miou_no_crf", "pseudo_miou", "seg_miou"):
        assert s["metrics"][k] is not None and 0 <= s["metrics"][k] <= 1, (k, s["metrics"])
    assert (run_dir / "summary.md").is_file() and (run_dir / "figure.png").is_file()
    groups = {row["group"] for row in s["ablation"]}
    assert {"backbone init × CRF", "attention type × refinement (pretrained, CRF off)"} <= groups, groups
    assert "final segmentation mIoU" in r.stdout
    print(f"quick pipeline: {dt:.0f} s")


def test_rerun_skips_finished_stages(quick_run):
    run_dir, _, _ = quick_run
    before = {p: p.stat().st_mtime for p in run_dir.glob("*/*.ipynb")}
    r, dt = _run(["--quick", "--run-dir", str(run_dir)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("skipped") >= len(STAGES), r.stdout[-3000:]
    assert {p: p.stat().st_mtime for p in run_dir.glob("*/*.ipynb")} == before       # no notebook re-executed
    print(f"a fully finished run took {dt:.0f} s")                                  # (timings: bench/, not asserts)


def test_bad_override_keeps_finished_work(quick_run):
    """Issue 16 item 1: `-p train_cam.epochs=abc` on a re-run emptied 01_train_cam (checkpoints gone) before the
    notebook refused it."""
    run_dir, _, _ = quick_run
    snap = lambda: {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
                    if p.is_file()}
    before = snap()
    assert any(p.endswith(".pt") for p in before if p.startswith("01_train_cam/")), sorted(before)[:20]
    r, _ = _run(["--quick", "--run-dir", str(run_dir), "-p", "train_cam.epochs=abc"])
    assert r.returncode == 2 and "-p train_cam.epochs='abc': expected an int" in r.stderr, r.stderr[-2000:]
    after = snap()
    assert {k: v for k, v in after.items() if k != "pipeline_config.json"} == \
           {k: v for k, v in before.items() if k != "pipeline_config.json"}


def test_neutral_parameters_rerun_nothing(quick_run):
    "Issue 16 item 14: progress, n_fig and the CRF worker count wiped and re-ran the downstream stages."
    run_dir, _, _ = quick_run
    before = {p: p.stat().st_mtime for p in run_dir.glob("*/*.ipynb")}
    r, _ = _run(["--quick", "--run-dir", str(run_dir), "-p", "evaluate.n_fig=1", "-p", "pseudo_labels.workers=2",
                 "-p", "progress=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("skipped") >= len(STAGES), r.stdout[-3000:]
    assert {p: p.stat().st_mtime for p in run_dir.glob("*/*.ipynb")} == before


def test_failed_rerun_puts_the_finished_stage_back(quick_run):
    """A new value the notebook refuses (a split that does not exist): the finished Phase-1 run comes back, the failed
    one is kept."""
    run_dir, _, _ = quick_run
    sdir = run_dir / "01_train_cam"
    files = sorted(p.name for p in sdir.iterdir())
    fp = json.loads((sdir / "pipeline.json").read_text())["fingerprint"]
    r, _ = _run(["--quick", "--run-dir", str(run_dir), "--stages", "train_cam", "-p", "train_cam.val_split=nosuch"])
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    failed_nb = run_dir / "01_train_cam.failed" / "train_cam.ipynb"
    assert f"stage 'train_cam' failed in {failed_nb} (cell " in r.stderr and failed_nb.is_file(), r.stderr[-2000:]
    st = json.loads((sdir / "pipeline.json").read_text())
    assert (st["status"], st["fingerprint"]) == ("done", fp) and sorted(p.name for p in sdir.iterdir()) == files
    assert not (run_dir / "01_train_cam.previous").exists()


def test_force_recomputes(quick_run):
    "Issue 16 item 5: --force re-ran gen_cams in its old folder, where it skipped every image and reported done."
    run_dir, _, _ = quick_run
    r, _ = _run(["--quick", "--run-dir", str(run_dir), "--stages", "gen_cams", "--force"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "02_gen_cams" / "summary.json").read_text())
    assert s["n_generated"] == 32 and s.get("n_skipped", 0) == 0, s        # the quick set's 32 train images, recomputed
    assert not (run_dir / "02_gen_cams.previous").exists()
    st = json.loads((run_dir / "03_pseudo_labels" / "pipeline.json").read_text())
    assert st["status"] == "done"                                        # same parameters downstream: still finished


def test_failing_stage_names_its_notebook(tmp_path):
    r, _ = _run(["--quick", "--no-ablation", "--run-dir", str(tmp_path / "bad"), "--stages", "train_cam",
                 "-p", "train_cam.val_split=nosuch"])
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    nb = tmp_path / "bad" / "01_train_cam" / "train_cam.ipynb"
    assert f"stage 'train_cam' failed in {nb} (cell " in r.stderr, r.stderr[-2000:]
    assert "nosuch" in r.stderr and nb.is_file()
    st = json.loads((nb.parent / "pipeline.json").read_text())
    assert st["status"] == "failed" and isinstance(st["cell"], int)


def test_bad_value_fails_before_running(tmp_path):
    r, _ = _run(["--quick", "--no-ablation", "--run-dir", str(tmp_path / "bad"), "--stages", "train_cam",
                 "-p", "train_cam.epochs=two"])
    assert r.returncode == 2 and "-p train_cam.epochs='two': expected an int" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "bad" / "01_train_cam").exists()


def test_unknown_override_fails_before_running(tmp_path):
    r, dt = _run(["--quick", "--no-ablation", "--run-dir", str(tmp_path / "x"), "-p", "train_cam.epochz=2"])
    assert r.returncode == 2 and "train_cam.ipynb has no parameter 'epochz'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x" / "01_train_cam").exists()
