"""Record a finished `./kit demo` run as the committed result files the README and the notebooks read.

    python tools/record_demo.py [RUN_DIR]     # default: runs/demo (the pipeline's default run folder)

copies RUN_DIR/summary.json to results/demo/summary.json and the ablation stage's summary (metrics, the issue-17
targets, rows, table) to results/ablation.json, each with the commit it was run from; then `./kit readme` renders the
tables from them. Refuses a run whose stages did not all finish, or whose ablation has no metrics.
"""
from __future__ import annotations

import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit(where: Path) -> str:
    "The commit of the checkout that holds `where` (the run folder's own clone), else of this one."
    for d in (where, ROOT):
        r = subprocess.run(["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip(): return r.stdout.strip()
    return "unknown"


def main(argv: list[str]) -> int:
    run = Path(argv[0] if argv else ROOT / "runs" / "demo").resolve()
    sp = run / "summary.json"
    if not sp.is_file():
        print(f"record_demo: {sp} not found (run ./kit demo first)", file=sys.stderr)
        return 1
    s = json.loads(sp.read_text())
    bad = [t["stage"] for t in s.get("stages", []) if t.get("status") not in (None, "done")]
    if bad:
        print(f"record_demo: stages not finished in {run}: {bad}", file=sys.stderr)
        return 1
    ab = next(iter(sorted(run.glob("*_ablation/summary.json"))), None)
    a = json.loads(ab.read_text()) if ab else {}
    if "metrics" not in a:
        print(f"record_demo: no ablation metrics under {run} (*_ablation/summary.json)", file=sys.stderr)
        return 1
    c = commit(run)
    s["commit"] = c
    out = dict(date=s.get("date"), machine=s.get("machine"), commit=c, command="./kit demo",
               run_dir=str(ab.parent), split=a.get("split"), n_images=a.get("n_images"),
               miou_rule="CAM rows: mIoU at each variant's best background threshold, no CRF; pseudo_miou: the "
                         "pseudo_labels stage (CRF); final_miou_*: Phase-2 val headline mIoU (MS + flip + CRF)",
               metrics=a["metrics"], targets=a["targets"], head_weights=a.get("head_weights"), rows=a["rows"],
               table_md=a.get("table_md"))
    (ROOT / "results" / "demo").mkdir(parents=True, exist_ok=True)
    (ROOT / "results" / "demo" / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    (ROOT / "results" / "ablation.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote results/demo/summary.json and results/ablation.json from {run} (commit {c})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
