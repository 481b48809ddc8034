"""Phase-1 training-step benchmark: WeakTr (fast attention) vs WeakTr (reference attention) vs a plain timm ViT.

One AdamW step on random data per iteration; reports the median step time, images/s and peak memory.
Peak memory is `torch.cuda.max_memory_allocated` on GPU (weights + grads + AdamW state + activations,
counted from before the model is built). On CPU each model runs in a fresh subprocess and the peak is the
rise of the process's peak RSS (`ru_maxrss`) over its RSS just before the model is built (allocator
caching makes this an upper bound of what the step needs).

    python bench/bench_phase1.py --device cpu --batch 8 --img 224 --steps 3 --out runs/bench/phase1_cpu.json
    python bench/bench_phase1.py --device cuda --batch 64 --amp bf16 --steps 20 --out runs/bench/phase1_gpu.json
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
from _timing import add_process_args, peak_rss_mib, rss_mib, run_child, time_steps  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import timm  # noqa: E402

from weaktr.core import atomic_save_json, get_device  # noqa: E402
from weaktr.model import create_weaktr, weaktr_loss  # noqa: E402

MODELS = {"weaktr_fast": "WeakTr, fast attention (SDPA + no-grad probs)",
          "weaktr_reference": "WeakTr, reference attention (probs in graph)",
          "timm_vit": "plain timm ViT, fused attention, 1000-class head, CE"}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}



def measure(kind: str, args) -> dict:
    "Build one model, run warm-up + timed AdamW steps on random data, return timings and peak memory."
    dev = get_device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, img = args.batch, args.img
    x = torch.randn(B, 3, img, img, device=dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        mem0 = torch.cuda.memory_allocated(dev)
    else:
        rss0 = rss_mib()
    if kind == "timm_vit":
        model = timm.create_model(args.backbone, pretrained=False, num_classes=1000, img_size=img, drop_path_rate=0.1)
        assert all(getattr(b.attn, "fused_attn", False)
                   for b in model.blocks), "timm fused attention is off (TIMM_FUSED_ATTN?)"
        target = torch.randint(0, 1000, (B,), device=dev)
        loss_fn = lambda out: F.cross_entropy(out.float(), target)
    else:
        model = create_weaktr(args.backbone, args.classes, img_size=img, drop_path_rate=0.1,
                              attn_impl=kind.removeprefix("weaktr_"), fusion=args.fusion)
        target = (torch.rand(B, args.classes, device=dev) < 0.15).float()
        loss_fn = lambda out: weaktr_loss(out, target)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    dtype = AMP[args.amp]
    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")

    def step():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    times, loss = time_steps(step, dev, args.warmup, args.steps)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - mem0) / 2**20
    else:
        peak = peak_rss_mib() - rss0
    med = statistics.median(times)
    return dict(model=kind, description=MODELS[kind], step_ms=1000 * med, step_ms_all=[1000 * t for t in times],
                img_per_s=B / med, peak_mem_mib=peak, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                final_loss=float(loss),
                memory_kind="cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS rise")


def table(results, args, dev) -> str:
    base = next((r for r in results if r["model"] == "timm_vit"), None)
    lines = [f"Phase-1 training step: {args.backbone}, batch {args.batch}, {args.img}px, C={args.classes}, "
             f"amp={args.amp}, device={dev}, {args.steps} timed steps after {args.warmup} warm-up",
             "", "| model | step (ms, median) | img/s | peak mem (MiB) | params (M) | time vs timm | mem vs timm |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        rt = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "-"
        rm = f"{r['peak_mem_mib'] / base['peak_mem_mib']:.2f}x" if base and base["peak_mem_mib"] > 0 else "-"
        lines.append(f"| {r['model']} | {r['step_ms']:.0f} | {r['img_per_s']:.1f} | {r['peak_mem_mib']:.0f} | "
                     f"{r['params_m']:.2f} | {rt} | {rm} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--amp", choices=list(AMP), default="off", help="autocast dtype (fp16 adds a GradScaler)")
    p.add_argument("--classes", type=int, default=20, help="C for WeakTr (20 VOC, 90 COCO)")
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--fusion", default="v3")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    add_process_args(p, "model")
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(measure(args._child, args)))
        return
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in MODELS]
    if unknown: p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    dev = get_device(args.device)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and dev.type != "cuda")
    t0 = time.time()
    results = [run_child(__file__, k) if isolate else measure(k, args) for k in kinds]
    md = table(results, args, dev)
    print(md)
    if args.out:
        info = dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                    device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda"
                    else platform.processor(),
                    cpu_threads=torch.get_num_threads(), wall_s=time.time() - t0)
        atomic_save_json(dict(args={k: v for k, v in vars(args).items() if k != "_child"}, env=info,
                              results=results, markdown=md), args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
