"""Issue 17 study: does AAF learn to choose heads, and does its choice help the CAM? (seeds of one short recipe)

For each seed, a short Phase-1 run with the kit's stage (`weaktr.train_cam.train_cam`, the demo's model and data,
fine-tuned from the shipped backbone; recipe in the JSON) and, on the val split (scale 1 + flip, no CRF, each
variant at its best background threshold of 0.05..0.90):

* `head_weight_std` / `head_weight_mean` / min / max of the AAF weights (`weaktr.ablation.head_weight_stats`);
* CAM mIoU with the learned weights, with uniform weights (each image's mean weight for every head,
  `weaktr.ablation.uniform_head_weights`) and without refinement.

Whether the weights spread at all depends on the seed; where they spread, the image-label loss chooses heads by
their class evidence, not by how well they localise (the fine prediction keeps only the affinity's column sums,
notebook 04). Results (fractions) go to results/aaf_study.json; runs are reused when present.

    python bench/aaf_study.py --seeds 0,1,2,3,4,5 --design palette
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from weaktr.ablation import cam_curve, head_weight_stats, uniform_head_weights  # noqa: E402
from weaktr.core import atomic_save_json  # noqa: E402
from weaktr.model import load_cam_model  # noqa: E402
from weaktr.pretrain import cpu_info  # noqa: E402
from weaktr.pseudo import best_threshold  # noqa: E402
from weaktr.synth import SYNTH_DEFAULT, SYNTH_PARTS, make_synthetic_keyed, synthetic_dataset  # noqa: E402
from weaktr.train_cam import CAM_TRAIN_DEMO, train_cam  # noqa: E402
from weaktr.zoo import DEMO_ASSET, asset_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(epochs=8, batch_size=16, lr=1e-3, warmup_epochs=1, weight_decay=0.03, drop_path=0.0,
              crop_scale=(1.0, 1.0), eval_cam_miou=False, select_metric="sample_map_tok", eval_every=8)
THRESHOLDS = [round(float(t), 2) for t in np.arange(0.05, 0.901, 0.05)]
DESIGNS = dict(palette=SYNTH_DEFAULT, parts=SYNTH_PARTS)


def best(curve):
    r = best_threshold(curve)
    return r["miou"], r["threshold"]


def run_seed(seed, data, runs, args):
    cfg = {**CAM_TRAIN_DEMO, **RECIPE, "seed": seed, "run_dir": str(runs / f"{args.design}_seed{seed}"),
           "data_root": str(data), "pretrained": str(asset_path(DEMO_ASSET)), "device": "cpu", "progress": False,
           "num_workers": 0}
    t0 = time.time()
    train_cam(cfg)
    seconds = round(time.time() - t0, 1)
    model = load_cam_model(cfg["run_dir"], device="cpu")
    ds = synthetic_dataset(data, "val", labels="masks")
    idx = list(range(len(ds)))
    stats = head_weight_stats(model, ds, idx)
    learned, t_l = best(cam_curve(model, ds, idx, THRESHOLDS, (1.0,), "fused", True))
    unref, t_u = best(cam_curve(model, ds, idx, THRESHOLDS, (1.0,), "fused", False))
    with uniform_head_weights(model):
        uni, t_n = best(cam_curve(model, ds, idx, THRESHOLDS, (1.0,), "fused", True))
    return dict(seed=seed, train_seconds=seconds, **stats, miou_learned_weights=learned, t_learned=t_l,
                miou_uniform_weights=uni, t_uniform=t_n, miou_unrefined=unref, t_unrefined=t_u)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--design", default="palette", choices=list(DESIGNS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="runs/aaf_study")
    ap.add_argument("--out", default="results/aaf_study.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = (ROOT / args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    data = make_synthetic_keyed(ROOT / "runs" / "data", **DESIGNS[args.design])
    out = ROOT / args.out
    state = json.loads(out.read_text()) if out.is_file() else dict(rows=[])
    state.update(machine=cpu_info(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 command="python bench/aaf_study.py " + " ".join(sys.argv[1:]),
                 recipe={k: list(v) if isinstance(v, tuple) else v for k, v in RECIPE.items()},
                 base="weaktr.train_cam.CAM_TRAIN_DEMO (the demo's tiny model, 64 px, patch 8, 4 blocks x 4 heads)",
                 eval="val split, scale 1 + flip, no CRF, best threshold of 0.05..0.90 (step 0.05) per variant")
    for s in map(int, args.seeds.split(",")):
        r = dict(design=args.design, **run_seed(s, data, runs, args))
        state["rows"] = [x for x in state["rows"] if (x["design"], x["seed"]) != (args.design, s)] + [r]
        atomic_save_json(state, out)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
