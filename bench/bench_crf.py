"""Pseudo-label benchmark: threshold + dense label CRF + PNG writing, images/s with 1 and N worker processes.

Runs `weaktr.pseudo.write_pseudo_labels` (the work of the pseudo-label stage) on real VOC images from the shared
`voc-mini` set. The CAMs are simulated from the ground truth (`weaktr.testing.simulated_cams`: blurred, noisy class
masks), which has the size and class count of real CAM files; the CRF cost does not depend on where the maps come from.
Each worker count writes into a fresh folder; the labels of all runs must be identical.

    python bench/bench_crf.py --images 16 --workers 1 2            # VOC preset (crf_inference_label, 10 iterations)
    python bench/bench_crf.py --images 64 --workers 1 4 8 --crf coco
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from weaktr.camgen import save_cams  # noqa: E402
from weaktr.core import atomic_save_json, shared_data  # noqa: E402
from weaktr.data import read_mask, voc_dataset  # noqa: E402
from weaktr.metrics import miou  # noqa: E402
from weaktr.testing import simulated_cams  # noqa: E402
from weaktr.pseudo import write_pseudo_labels  # noqa: E402


def _cpu_s() -> float:
    "CPU seconds (user + system) of this process and its finished children so far."
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="first n images of voc-mini train")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (1 = in-process)")
    ap.add_argument("--crf", default="voc", help="voc | coco | none")
    ap.add_argument("--threshold", type=float, default=0.43)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = shared_data("voc-mini")
    ds = voc_dataset(root, "train")
    idx = list(range(min(a.images, len(ds))))
    tmp = Path(tempfile.mkdtemp(prefix="bench_crf_"))
    try:
        cams = tmp / "cams"
        sizes = []
        for i in idx:
            id = ds.ids[i]
            mask = ds.read_mask(id)
            maps, ids = simulated_cams(np.where(mask == 255, 0, mask), ds.num_classes, sigma=8.0, seed=i)
            save_cams(cams / f"{id}.npz", maps, ids, size=mask.shape)
            sizes.append(mask.shape)
        mean_px = float(np.mean([h * w for h, w in sizes]))
        print(f"{len(idx)} voc-mini images (mean {mean_px / 1e3:.0f} kpx), CRF {a.crf!r}, t = {a.threshold}, "
              f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")
        runs, first = [], None
        for w in a.workers:
            out = tmp / f"pseudo_w{w}"
            c0 = _cpu_s()
            r = write_pseudo_labels(ds, cams, out, a.threshold, a.crf, workers=w, indices=idx, progress=False)
            cpu = _cpu_s() - c0
            labels = {p.stem: read_mask(p) for p in sorted(out.glob("*.png"))}
            if first is None: first = labels
            same = labels.keys() == first.keys() and all(np.array_equal(labels[k], first[k]) for k in labels)
            assert same and r["n_written"] == len(idx), f"workers={w}: labels differ from the first run"
            runs.append(dict(workers=w, seconds=round(r["seconds"], 3), images_per_s=round(len(idx) / r["seconds"], 3),
                             cpu_s_per_image=round(cpu / len(idx), 4), miou=miou(r["conf"])[0]))
            print(f"  workers={w}: {runs[-1]['images_per_s']:6.2f} img/s  ({r['seconds']:.2f} s wall incl. pool start, "
                  f"{runs[-1]['cpu_s_per_image']:.3f} CPU-s/img; pseudo-label mIoU vs GT {runs[-1]['miou']:.3f})")
        base = runs[0]["seconds"]
        for r in runs[1:]:
            print(f"  speed-up {r['workers']} vs {runs[0]['workers']} workers: {base / r['seconds']:.2f}x")
        res = dict(images=len(idx), mean_kpx=round(mean_px / 1e3, 1), crf=a.crf, threshold=a.threshold,
                   cpus=os.cpu_count(),
                   load_average=os.getloadavg()[0], runs=runs)
        if a.out: atomic_save_json(res, a.out)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
