"""CAM-generation benchmark: the per-image reference path vs the batched path of `weaktr.camgen`, same images.

Both paths start from PIL images (view building included), run the §cam-gen recipe (scales x flip, refinement,
upsampling, masking, normalisation) and return (C, H, W) maps; the script asserts that the maps agree (max abs diff
printed) and reports images/s for both and the speed-up. The model is a random WeakTr whose attention is sharpened
(`weaktr.testing.sharpen_attention`) so that the normalised maps have contrast, as a trained model's do.

    python bench/bench_camgen.py --preset cpu-small --device cpu --threads 1          # < 2 min on a laptop core
    python bench/bench_camgen.py --preset voc --device cuda --amp bf16 --images 64     # VOC-like: 368x496, ViT-S

Presets: `voc` = deit_small_patch16_224 (ViT-S), C=20, 368x496 images, scales (1.0, 0.8, 1.2), fused + refine, batch 8;
`cpu-small` = deit_tiny_patch16_224 (ViT-Ti), C=20, 112x144 images, same scales, batch 8.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from weaktr.core import amp_dtype  # noqa: E402
from weaktr.camgen import cams_batched, cams_reference  # noqa: E402
from weaktr.testing import sharpen_attention  # noqa: E402
from weaktr.core import atomic_save_json, get_device  # noqa: E402
from weaktr.synth import render_synthetic  # noqa: E402
from weaktr.model import create_weaktr  # noqa: E402

PRESETS = {
    "voc": dict(backbone="deit_small_patch16_224", num_classes=20, height=368, width=496, scales=(1.0, 0.8, 1.2),
                batch=8, images=32),
    "cpu-small": dict(backbone="deit_tiny_patch16_224", num_classes=20, height=112, width=144, scales=(1.0, 0.8, 1.2),
                      batch=8, images=16),
}


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def make_images(n, H, W, C, seed=0):
    "n synthetic RGB images of size W x H and random multi-hot labels (1-3 classes each)."
    rng = np.random.default_rng(seed)
    imgs, labels = [], torch.zeros(n, C)
    for i in range(n):
        arr, _ = render_synthetic(np.random.default_rng([seed, i]), 64, 6, (1, 3), 0.5, (0.12, 0.26), 0.5, 3.0)
        imgs.append(Image.fromarray(arr).resize((W, H), Image.BILINEAR))
        labels[i, rng.choice(C, size=rng.integers(1, 4), replace=False)] = 1
    return imgs, labels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="off", help="off | bf16 | fp16 | auto (both paths use it)")
    ap.add_argument("--images", type=int, default=0, help="images (0: the preset's)")
    ap.add_argument("--batch", type=int, default=0, help="images per batch on the batched path (0: the preset's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--attention-type", default="fused")
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--tol", type=float, default=0.0, help="max abs diff allowed (0: 1e-4 for fp32, 5e-2 under amp)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset])
    n, B = a.images or p["images"], a.batch or p["batch"]
    if a.threads: torch.set_num_threads(a.threads)
    dev = get_device(a.device)
    dtype = amp_dtype(a.amp, dev)
    torch.manual_seed(0)
    model = sharpen_attention(create_weaktr(p["backbone"], p["num_classes"]), 4.0).to(dev).eval()
    imgs, labels = make_images(n, p["height"], p["width"], p["num_classes"])
    kw = dict(scales=p["scales"], attention_type=a.attention_type, refine=not a.no_refine, amp=a.amp)

    cams_reference(model, imgs[0], labels[0], **kw)
    cams_batched(model, imgs[:2], labels[:2], **kw)                                                    # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    ref = [cams_reference(model, im, y, **kw) for im, y in zip(imgs, labels)]
    _sync(dev)
    t_ref = time.perf_counter() - t0

    _sync(dev)
    t0 = time.perf_counter()
    bat = []
    for k in range(0, n, B): bat += cams_batched(model, imgs[k:k + B], labels[k:k + B], **kw)
    _sync(dev)
    t_bat = time.perf_counter() - t0

    diff = max(float((r - b).abs().max()) for r, b in zip(ref, bat))
    tol = a.tol or (1e-4 if dtype is None else 5e-2)
    res = dict(preset=a.preset, backbone=p["backbone"], image_hw=[p["height"], p["width"]], scales=list(p["scales"]),
               views_per_image=2 * len(p["scales"]), images=n, batch=B, attention_type=a.attention_type,
               refine=not a.no_refine, amp=str(dtype).replace("torch.", "") if dtype else "fp32", device=str(dev),
               device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
               or platform.machine(),
               threads=torch.get_num_threads(), reference_s=round(t_ref, 3), batched_s=round(t_bat, 3),
               reference_img_s=round(n / t_ref, 3), batched_img_s=round(n / t_bat, 3), speedup=round(t_ref / t_bat, 3),
               max_abs_diff=diff, tol=tol)
    print(f"{a.preset}: {p['backbone']} C={p['num_classes']} {p['height']}x{p['width']} scales={p['scales']} x flip, "
          f"{n} images, batch {B}, {res['amp']} on {dev} ({res['threads']} threads)")
    print(f"  reference (per image, per view): {res['reference_img_s']:8.2f} img/s  ({t_ref:.2f} s)")
    print(f"  batched   (size groups)        : {res['batched_img_s']:8.2f} img/s  ({t_bat:.2f} s)")
    print(f"  speed-up batched / reference   : {res['speedup']:.2f}x")
    print(f"  max |batched - reference|      : {diff:.3g}  (tolerance {tol:g})")
    if a.out: atomic_save_json(res, a.out)
    assert diff <= tol, f"batched and reference maps differ by {diff} > {tol}"
    return res


if __name__ == "__main__":
    main()
