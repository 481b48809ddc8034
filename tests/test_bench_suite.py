"""bench/run.py (the benchmark suite's entry point): section replacement in BENCHMARKS.md, the demo row, the CLI.

The benchmarks themselves are timed by `python bench/run.py` (minutes); here only the cheap plumbing is checked.
"""
import importlib.util
import json
import subprocess
import sys

from weaktr.core import REPO_ROOT


def _load():
    spec = importlib.util.spec_from_file_location("bench_run", REPO_ROOT / "bench" / "run.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_update_replaces_only_its_section(tmp_path):
    m = _load()
    f = tmp_path / "BENCHMARKS.md"
    a1 = "<!-- bench:cpu-x:start -->\n## CPU: x\nold\n<!-- bench:cpu-x:end -->"
    b = "<!-- bench:gpu-h100:start -->\n## GPU: H100\nkept\n<!-- bench:gpu-h100:end -->"
    m.update_file(f, "cpu-x", a1)                                     # new file: header + section
    m.update_file(f, "gpu-h100", b)
    m.update_file(f, "cpu-x", a1.replace("old", "new"))               # replaced in place, GPU section kept
    text = f.read_text()
    assert text.startswith("# Benchmarks") and "Targets are judged on the ratio column" in text
    assert "new" in text and "old" not in text and "kept" in text and text.count("bench:cpu-x:start") == 1
    assert text.index("cpu-x:start") < text.index("gpu-h100:start")


def test_demo_row_and_section(tmp_path):
    m = _load()
    rec, rows = m.demo_row(tmp_path / "missing" / "summary.json")
    assert rec["status"] == "skipped" and rows == []
    (tmp_path / "summary.json").write_text(json.dumps(dict(stage_seconds_total=600.0, wall_s=610.0,
                                                           machine="cpu, 2 cores",
                                                           device="cpu", date="2026-01-01", stages=[], metrics={})))
    rec, rows = m.demo_row(tmp_path / "summary.json")
    assert rec["status"] == "ok" and rows[0]["ours"] == "600" and abs(rows[0]["ratio"] - 600 / 900) < 1e-9
    env = dict(date="d", torch="t", timm="m", python="p", cpu_count=2, bench_threads=1, load_average_start=1.0,
               load_average_end=2.0)
    rows.append(dict(bench="b", setting="max |x|", ours="1", baseline="2", ratio=0.5, better="higher"))
    md = m.section("cpu-x", "CPU: x", env, "python bench/run.py", "quick", {"demo": rec}, rows)
    assert "| b | max \\|x\\| | 1 | 2 | **0.50x** (higher is better) |" in md        # cell text cannot break the table
    assert md.startswith("<!-- bench:cpu-x:start -->") and md.endswith("<!-- bench:cpu-x:end -->")


def test_cli_rejects_unknown_benchmark():
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--only", "nope"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--only: unknown ['nope']" in r.stderr
