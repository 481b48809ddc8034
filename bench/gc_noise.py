"""Issue 17 controlled experiment: Phase 2 with the gradient-clipping (GC) loss vs plain CE under label noise of
known rate.

The synthetic default set's train masks (ground truth) are corrupted with weaktr.noise.write_noisy_labels (structured
noise: every object dilated, eroded or with a blob given the wrong class, by `rate` of its area) and used as the
pseudo labels of weaktr.train_seg.train_seg; each (rate, seed) trains twice, gc=True and gc=False, everything else
identical (labels, seed, recipe). The final val mIoU (fraction, last epoch, clean val GT) goes to a JSON file
(machine, date, command, recipe, one record per run) and a figure of mIoU against the noise rate.
Runs live under runs/gc_noise (git-ignored); a finished run (summary.json + seconds.json) is reused.

    python bench/gc_noise.py --out results/gc_noise.json --fig nbs/images/gc_noise.png --rates 0 0.1 0.2 0.3 --seeds 0 1
    python bench/gc_noise.py --out results/gc_noise.json --fig nbs/images/gc_noise.png --replot   # figure only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from weaktr.core import atomic_save_json  # noqa: E402
from weaktr.noise import NOISE_MODES, write_noisy_labels  # noqa: E402
from weaktr.pipeline import DEMO, backbone_params  # noqa: E402
from weaktr.synth import SYNTH_DEFAULT, make_default_synthetic, synthetic_dataset  # noqa: E402
from weaktr.train_seg import train_seg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe(epochs: int, max_train: int) -> dict:
    "The demo's Phase-2 recipe (pipeline.DEMO['train_seg'], gc_start 0.5 of SEG_TRAIN_DEMO), shipped backbone init."
    bb = backbone_params()
    arch = {k: bb[k] for k in ("backbone", "embed_dim", "depth", "num_heads", "patch_size")}
    return {"data": "synthetic", **arch, "init_path": bb["path"], **DEMO["train_seg"], "gc_start": 0.5,
            "epochs": epochs, "val_every": 5, "max_train_images": max_train, "device": "cpu", "progress": False,
            "num_workers": 0}


def run_one(cfg: dict, run_dir: Path) -> tuple[dict, float]:
    "Train (or reuse a finished run): -> (summary, seconds)."
    sec_file = run_dir / "seconds.json"
    if (run_dir / "summary.json").is_file() and sec_file.is_file():
        s = json.loads((run_dir / "summary.json").read_text())
        if s.get("finished"): return s, json.loads(sec_file.read_text())["seconds"]
    t0 = time.time()
    s = train_seg({**cfg, "run_dir": str(run_dir), "resume": False})
    sec = round(time.time() - t0, 1)
    atomic_save_json({"seconds": sec}, sec_file)
    return s, sec


def plot(runs: list, fig_path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for gc, colour, name in ((True, "tab:blue", "GC loss"), (False, "tab:orange", "plain CE")):
        rs = [r for r in runs if r["gc"] == gc]
        rates = sorted({r["rate"] for r in rs})
        mean = [np.mean([r["miou"] for r in rs if r["rate"] == x]) for x in rates]
        ax.plot([100 * x for x in rates], [100 * m for m in mean], "-o", color=colour, label=f"{name} (mean)")
        ax.scatter([100 * r["measured_rate"] for r in rs], [100 * r["miou"] for r in rs], s=14, color=colour,
                   alpha=0.45, marker="x")
    ax.set_xlabel("label noise: changed fraction of object area (%)")
    ax.set_ylabel("final val mIoU (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fig_path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/gc_noise.json")
    p.add_argument("--fig", default="nbs/images/gc_noise.png")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--mode", default="mixed", choices=NOISE_MODES)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-train", type=int, default=0, help="first n training images (0 = all 600)")
    p.add_argument("--runs", default="runs/gc_noise", help="work folder (labels and run folders)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replot", action="store_true", help="only redraw --fig from the runs already in --out")
    a = p.parse_args(argv)
    if a.replot:
        res = json.loads(Path(a.out).read_text())
        seeds = sorted({r["seed"] for r in res["runs"]})
        plot(res["runs"], Path(a.fig),
             f"synthetic set, mode {res['noise']['mode']!r}, {res['recipe']['epochs']} epochs, seeds {seeds}")
        return res
    torch.set_num_threads(a.threads)
    runs_dir = (ROOT / a.runs).resolve()
    root = make_default_synthetic()
    train = synthetic_dataset(root, "train")
    cfg = recipe(a.epochs, a.max_train)
    cfg["data_root"] = str(root)
    out = dict(experiment="Phase 2 (weaktr.train_seg) on corrupted ground truth: GC loss vs plain CE",
               machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                            cpu_count=os.cpu_count(), torch_threads=a.threads, torch=torch.__version__,
                            python=platform.python_version()),
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
               data=dict(SYNTH_DEFAULT, split_train="train", split_val="val"),
               recipe={k: v for k, v in cfg.items() if k not in ("data_root", "init_path", "gc")} | dict(
                   init_asset=Path(cfg["init_path"]).name, gc_window=cfg["gc_window"],
                   note="weaktr.pipeline.DEMO['train_seg'] + gc_start 0.5 (SEG_TRAIN_DEMO); epochs / val_every as "
                        "given; identical for the GC and CE arms except `gc`"),
               noise=dict(mode=a.mode, rates=a.rates, seeds=a.seeds,
                          note="weaktr.noise.write_noisy_labels: per object, `rate` of its area dilated, eroded or "
                               "relabelled as a connected blob (mode 'mixed': one of the three at random per object); "
                               "measured_rate = changed pixels / object pixels over the train split"),
               timing_note="seconds: wall clock of one run (training + two validations), 1 torch thread; on a shared "
                           "machine they vary with its load",
               metric="final val mIoU (fraction, last epoch, single-scale sliding window, clean val GT)",
               runs=[])
    out_path = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    for seed in a.seeds:
        for rate in a.rates:
            tag = f"{a.mode}_r{rate:g}_s{seed}"
            labels = runs_dir / "labels" / tag
            info = write_noisy_labels(train, labels, rate, a.mode, seed)
            for gc in (True, False):
                rd = runs_dir / f"{tag}_e{a.epochs}_n{a.max_train}_{'gc' if gc else 'ce'}"
                s, sec = run_one({**cfg, "pseudo_dir": str(labels), "gc": gc, "seed": seed}, rd)
                rec = dict(rate=rate, mode=a.mode, measured_rate=round(info["measured"], 5), gc=gc, seed=seed,
                           miou=s["miou"], miou_epoch=s["miou_epoch"], best_miou=s["best_miou"],
                           train_ce=s["train_ce"], gc_on=s["gc_on"], steps=s["steps"], seconds=sec)
                out["runs"].append(rec)
                print(json.dumps(rec), flush=True)
                atomic_save_json(out, out_path)
    plot(out["runs"], (ROOT / a.fig) if not Path(a.fig).is_absolute() else Path(a.fig),
         f"synthetic set, mode {a.mode!r}, {a.epochs} epochs, seeds {a.seeds}")
    return out


if __name__ == "__main__":
    main()
