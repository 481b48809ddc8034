"""Phase-2 benchmark: Segmenter training step (kit vs reference-equivalent) and sliding-window evaluation
(batched vs window by window, identical predictions asserted).

Training: one SGD (Nesterov, encoder lr x 0.1) step of the gradient-clipping loss on random crops per iteration,
at each batch size of --batches. Two paths:
  kit        timm fused attention (SDPA) in encoder and decoder, autocast --amp (fp16 + GradScaler on GPU)
  reference  explicit attention (`attn.fused_attn = False` on every block, as the reference's own ViT computes
             softmax(q k^T) v), --ref-amp (the reference trains without AMP: fp32)
Peak memory: `torch.cuda.max_memory_allocated` on GPU (counted from before the model is built); on CPU each
configuration runs in a fresh subprocess and the peak is the rise of peak RSS over the RSS before the model.

Evaluation: multi-scale (6 ratios) x flip x two decoder outputs, §final-eval, on random images with a random model:
`weaktr.evaluate.predict` (all windows batched, --window-batch) vs `predict_windowed_reference` (one window at a
time, the reference's order). Reports img/s of each and asserts identical argmax and max |dp| < --tol.

    python bench/bench_phase2.py --device cpu --img 128 --batches 4 16 --steps 2 --eval-images 2 --threads 2
    python bench/bench_phase2.py --device cuda --img 480 --batches 4 16 --amp fp16 --steps 20 --eval-images 10 \
        --out runs/bench/phase2_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _timing import add_process_args, peak_rss_mib, rss_mib, run_child, sync, time_steps  # noqa: E402
import timm  # noqa: E402

from weaktr.core import atomic_save_json, get_device  # noqa: E402
from weaktr.decoder import ClipCfg, seg_loss  # noqa: E402
from weaktr.evaluate import MS_RATIOS, InferCfg, predict, predict_windowed_reference  # noqa: E402
from weaktr.learner import param_groups  # noqa: E402
from weaktr.segmenter import create_segmenter  # noqa: E402

PATHS = {"kit": "fused attention (SDPA), autocast --amp",
         "reference": "explicit attention, --ref-amp (reference: fp32)"}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}



def build(args, dev, path: str, img: int):
    "A Segmenter on `dev`; the reference path switches every attention block to the explicit softmax(q k^T) v."
    torch.manual_seed(0)
    model = create_segmenter(args.backbone, num_classes=args.classes, img_size=img)
    blocks = [*model.encoder.blocks, *model.decoder.blocks]
    if path == "reference":
        for b in blocks: b.attn.fused_attn = False
    else:
        assert all(b.attn.fused_attn for b in blocks), "timm fused attention is off (TIMM_FUSED_ATTN?)"
    return model.to(dev)


def measure_train(path: str, B: int, args) -> dict:
    "Warm-up + timed SGD steps of the GC loss at batch B; timings and peak memory."
    dev = get_device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    img = args.img
    amp = args.amp if path == "kit" else args.ref_amp
    if amp == "auto": amp = "fp16" if dev.type == "cuda" else "off"
    dtype = AMP[amp]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, img, img, generator=g).to(dev)
    target = torch.randint(0, args.classes, (B, img, img), generator=g)
    target[:, :, : img // 8] = 255                                       # a padded / ignored strip, as in real crops
    target = target.to(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        mem0 = torch.cuda.memory_allocated(dev)
    else:
        rss0 = rss_mib()
    model = build(args, dev, path, img).train()
    opt = torch.optim.SGD(param_groups(model, {"encoder.": 0.1}), lr=1e-4, momentum=0.9, nesterov=True)
    clip = ClipCfg(start_value=1e9, window=img // 4)                     # GC always on (its cost is what we time)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    def step():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss, _ = seg_loss(logits.float(), target, clip)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    times, loss = time_steps(step, dev, args.warmup, args.steps)
    peak = (torch.cuda.max_memory_allocated(dev) - mem0) / 2**20 if dev.type == "cuda" else peak_rss_mib() - rss0
    med = statistics.median(times)
    return dict(part="train", path=path, batch=B, amp=amp, step_ms=1000 * med, step_ms_all=[1000 * t for t in times],
                img_per_s=B / med, peak_mem_mib=peak, final_loss=float(loss),
                memory_kind="cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS rise")


def measure_eval(args) -> dict:
    """Batched vs window-by-window multi-scale + flip + two-output prediction on random images; equal predictions
    asserted."""
    dev = get_device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    win = args.img
    base = round(win * 520 / 480)
    H, W = args.eval_hw or (round(375 * win / 480), round(500 * win / 480))
    icfg = InferCfg(window=win, stride=round(win * 2 / 3), base_size=base, ratios=MS_RATIOS, flip=True, two_output=True,
                    window_batch=args.window_batch)
    model = build(args, dev, "kit", win).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g) for _ in range(args.eval_images)]
    out = dict(part="eval", image_hw=(H, W), window=win, stride=icfg.stride, base_size=base, ratios=MS_RATIOS,
               flip=True, two_output=True, window_batch=args.window_batch, images=len(images))
    predict(model, images[0], icfg)
    sync(dev)                                                             # warm-up (kernels, allocator)
    res = {}
    for name, fn in (("batched", predict), ("window_by_window", predict_windowed_reference)):
        t0 = time.perf_counter()
        probs = []
        for im in images:
            probs.append(fn(model, im, icfg).cpu())
        sync(dev)
        dt = time.perf_counter() - t0
        res[name] = probs
        out[f"{name}_s_per_img"] = dt / len(images)
        out[f"{name}_img_per_s"] = len(images) / dt
    diffs = [float((a - b).abs().max()) for a, b in zip(res["batched"], res["window_by_window"])]
    same = all(bool((a.argmax(0) == b.argmax(0)).all()) for a, b in zip(res["batched"], res["window_by_window"]))
    out.update(max_abs_prob_diff=max(diffs), identical_argmax=same,
               speedup=out["batched_img_per_s"] / out["window_by_window_img_per_s"])
    if not same or max(diffs) > args.tol:
        raise AssertionError(f"batched and window-by-window predictions differ: max |dp| = {max(diffs):.3g}, argmax "
                             f"equal = {same}")
    return out


def _child(spec: str, args) -> dict:
    if spec == "eval": return measure_eval(args)
    path, B = spec.split(":")
    return measure_train(path, int(B), args)


def table(results, args, dev) -> str:
    tr = [r for r in results if r["part"] == "train"]
    lines = [f"Phase-2 training step: {args.backbone}, {args.img}px crops, K={args.classes}, GC loss, SGD; "
             f"device={dev}; {args.steps} timed steps after {args.warmup} warm-up",
             "", "| path | batch | amp | step (ms, median) | img/s | peak mem (MiB) | speed vs reference | mem vs "
                 "reference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in tr:
        ref = next((q for q in tr if q["path"] == "reference" and q["batch"] == r["batch"]), None)
        sp = f"{ref['step_ms'] / r['step_ms']:.2f}x" if ref else "-"
        mm = f"{r['peak_mem_mib'] / ref['peak_mem_mib']:.2f}x" if ref and ref["peak_mem_mib"] > 0 else "-"
        lines.append(f"| {r['path']} | {r['batch']} | {r['amp']} | {r['step_ms']:.0f} | {r['img_per_s']:.1f} | "
                     f"{r['peak_mem_mib']:.0f} | {sp} | {mm} |")
    ev = next((r for r in results if r["part"] == "eval"), None)
    if ev:
        lines += ["", f"Evaluation: {ev['images']} random {ev['image_hw'][0]}x{ev['image_hw'][1]} images, window "
                      f"{ev['window']}/stride {ev['stride']}, base {ev['base_size']}, 6 ratios x flip x two outputs, "
                      f"window batch {ev['window_batch']}",
                  "", "| path | s / image | img/s |", "|---|---|---|",
                  f"| window by window (reference order) | {ev['window_by_window_s_per_img']:.3f} | "
                  f"{ev['window_by_window_img_per_s']:.2f} |",
                  f"| batched | {ev['batched_s_per_img']:.3f} | {ev['batched_img_per_s']:.2f} |",
                  "", f"speed-up {ev['speedup']:.2f}x; max |p_batched - p_window| = {ev['max_abs_prob_diff']:.2e}, "
                      f"identical argmax: {ev['identical_argmax']}"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--img", type=int, default=480, help="training crop = evaluation window (reference 480)")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--amp", choices=[*AMP, "auto"], default="auto",
                   help="kit path autocast (auto: fp16 on cuda, off on cpu)")
    p.add_argument("--ref-amp", choices=[*AMP, "auto"], default="off",
                   help="reference path autocast (the reference: off)")
    p.add_argument("--classes", type=int, default=21, help="K (21 VOC, 91 COCO)")
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--paths", default="kit,reference", help=f"comma list of {list(PATHS)}")
    p.add_argument("--eval-images", type=int, default=2, help="images for the evaluation benchmark (0: skip it)")
    p.add_argument("--eval-hw", type=int, nargs=2, default=None,
                   help="evaluation image H W (default: 375x500 scaled by img/480)")
    p.add_argument("--window-batch", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-4, help="max |dp| allowed between batched and window-by-window")
    add_process_args(p, "measurement")
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args._child, args)))
        return
    paths = [k.strip() for k in args.paths.split(",") if k.strip()]
    if [k for k in paths if k not in PATHS]: p.error(f"--paths: choose from {list(PATHS)}")
    dev = get_device(args.device)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and dev.type != "cuda")
    specs = [f"{k}:{B}" for B in args.batches for k in paths] + (["eval"] if args.eval_images else [])
    t0 = time.time()
    results = [run_child(__file__, s) if isolate else _child(s, args) for s in specs]
    md = table(results, args, dev)
    print(md)
    if args.out:
        info = dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(), device=str(dev),
                    device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                    cpu_threads=torch.get_num_threads(), wall_s=time.time() - t0)
        atomic_save_json(dict(args={k: v for k, v in vars(args).items() if k != "_child"}, env=info,
                              results=results, markdown=md), args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
