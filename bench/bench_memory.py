"""Phase-1 activation memory without a GPU: the bytes autograd saves for backward in one training forward.

What a GPU's training peak holds beyond weights and optimizer state is, above all, the tensors autograd saves for
backward. This script counts them on any device with `torch.autograd.graph.saved_tensors_hooks`: every saved tensor's
storage, each storage once (views share it), nn.Parameters excluded; model forward + loss, train mode, random init.

Models: WeakTr `attn_impl="fast"` (this checkout), `weaktr_fast_before` (the same model with the code before issue 14,
`fuse_heads` and `_attn_probs` verbatim below: autograd kept the fp32 attention stack, a copy of it under autocast),
WeakTr `attn_impl="reference"` and the
plain timm ViT (fused attention, 1000-class head, cross-entropy) as the baseline; fp32 and bf16 autocast; C = 20 (VOC)
and C = 90 (COCO) class tokens. With `--steps > 0` it also times the Phase-1 train step (AdamW, like
bench_phase1.py) of the fast path before vs after (and after with `recompute_attn=False`), interleaved step by step in
one process so load drifts hit all of them; on CPU the ratio uses the process's CPU time.
On CPU every measurement runs in its own subprocess (`--isolate`), so one model's allocations never inflate the next.

    python bench/bench_memory.py --out runs/bench/memory.json                     # batch 8, 224 px, C 20 and 90
    python bench/bench_memory.py --backbone deit_tiny_patch16_224 --batch 2 --steps 0
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import timm  # noqa: E402
from _timing import add_process_args, run_child, time_steps  # noqa: E402

import weaktr.backbone as wbackbone  # noqa: E402
import weaktr.model as wmodel  # noqa: E402
from weaktr.core import atomic_save_json, get_device  # noqa: E402
from weaktr.model import create_weaktr, weaktr_loss  # noqa: E402

MODELS = {"weaktr_fast": "WeakTr, fast attention (this checkout)",
          "weaktr_fast_before": "WeakTr, fast attention, code before issue 14 (fp32 stack kept for backward)",
          "weaktr_fast_keep": "WeakTr, fast attention, recompute_attn=False (the stack kept once, in its own dtype)",
          "weaktr_reference": "WeakTr, reference attention (probs in graph)",
          "timm_vit": "plain timm ViT, fused attention, 1000-class head, CE"}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
MiB = 2 ** 20


def legacy_attn_probs(q, k, scale):
    "`weaktr.backbone._attn_probs` before issue 14, verbatim (scaled out of place)."
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)


def legacy_fuse_heads(attn_stack, head_weights, recompute=None):
    "`weaktr.fusion.fuse_heads` before issue 14, verbatim: autograd keeps `attn_stack.float()` (a copy under autocast)."
    B, M = attn_stack.shape[:2]
    with torch.autocast(attn_stack.device.type, enabled=False):
        w = head_weights.reshape(B, M).float()
        return torch.einsum("bm,bmij->bij", w, attn_stack.float()) / M


@contextlib.contextmanager
def previous_code(on: bool = True):
    "Run WeakTr as before issue 14: `legacy_fuse_heads` and `legacy_attn_probs` swapped in, then restored."
    new = wmodel.fuse_heads, wbackbone._attn_probs
    if on: wmodel.fuse_heads, wbackbone._attn_probs = legacy_fuse_heads, legacy_attn_probs
    try: yield
    finally: wmodel.fuse_heads, wbackbone._attn_probs = new


def saved_tensor_bytes(fn, exclude=()) -> tuple[dict, object]:
    "Run fn() and count what autograd saves: -> (dict(bytes, tensors, by_dtype), fn's result). Each storage once."
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen = {}                                            # storage pointer -> (bytes, dtype, the tensor: keeps it alive)

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr and ptr not in skip and ptr not in seen:
            seen[ptr] = (st.nbytes(), str(t.dtype).removeprefix("torch."), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    by_dtype = {}
    for nb, dt, _ in seen.values(): by_dtype[dt] = by_dtype.get(dt, 0) + nb
    return dict(bytes=sum(nb for nb, _, _ in seen.values()), tensors=len(seen), by_dtype=by_dtype), out


def build(kind: str, args, classes: int, dev):
    "-> (model in train mode, x, loss_fn) for one of MODELS, seeded."
    torch.manual_seed(0)
    B, img = args.batch, args.img
    x = torch.randn(B, 3, img, img, device=dev)
    if kind == "timm_vit":
        model = timm.create_model(args.backbone, pretrained=False, num_classes=1000, img_size=img, drop_path_rate=0.1)
        target = torch.randint(0, 1000, (B,), device=dev)
        loss_fn = lambda out: F.cross_entropy(out.float(), target)
    else:
        impl = "reference" if kind == "weaktr_reference" else "fast"
        keep = dict(recompute_attn=False) if kind == "weaktr_fast_keep" else {}
        model = create_weaktr(args.backbone, classes, img_size=img, drop_path_rate=0.1, attn_impl=impl, **keep)
        target = (torch.rand(B, classes, device=dev) < 0.15).float()
        loss_fn = lambda out: weaktr_loss(out, target)
    return model.to(dev).train(), x, loss_fn


def measure_saved(kind: str, args, classes: int, amp: str, dev) -> dict:
    model, x, loss_fn = build(kind, args, classes, dev)
    dtype = AMP[amp]

    def fwd():
        with previous_code(kind == "weaktr_fast_before"), \
             torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return loss_fn(model(x))
    r, loss = saved_tensor_bytes(fwd, exclude=list(model.parameters()))
    return dict(model=kind, classes=classes if kind != "timm_vit" else None, amp=amp, saved_mib=r["bytes"] / MiB,
                saved_bytes=r["bytes"], tensors=r["tensors"],
                by_dtype_mib={k: v / MiB for k, v in r["by_dtype"].items()},
                loss=float(loss.detach()))


def measure_steps(args, classes: int, amp: str, dev) -> dict:
    "Phase-1 train step of the fast path, code before issue 14 vs now, alternating step by step on one model."
    model, x, loss_fn = build("weaktr_fast", args, classes, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    dtype = AMP[amp]

    def step(name):                               # before: code before issue 14; after: now; keep: recompute_attn=False
        def run():
            model.recompute_attn = name != "keep"
            amp = torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)
            with previous_code(name == "before"), amp:
                loss = loss_fn(model(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()
        return run

    names = ("before", "after", "keep")
    for _ in range(args.warmup):
        for name in names: step(name)()
    times, cpu = ({k: [] for k in names} for _ in range(2))
    for i in range(args.steps):                           # the order rotates: no variant always runs first
        for name in names[i % 3:] + names[:i % 3]:
            c0 = time.process_time()
            times[name] += time_steps(step(name), dev, 0, 1)[0]
            # CPU seconds of this process: what load on a shared CPU distorts least
            cpu[name].append(time.process_time() - c0)
    med, cmed = ({k: statistics.median(v) for k, v in d.items()} for d in (times, cpu))
    main = cmed if dev.type == "cpu" else med
    return dict(classes=classes, amp=amp, batch=args.batch, step_s=med, step_s_all=times, cpu_s=cmed, cpu_s_all=cpu,
                timed_by="process CPU time" if dev.type == "cpu" else "wall clock",
                img_per_s={k: args.batch / v for k, v in main.items()}, after_vs_before=main["before"] / main["after"],
                keep_vs_before=main["before"] / main["keep"], wall_after_vs_before=med["before"] / med["after"])


def table(res: dict) -> str:
    "Markdown: saved MiB per model (rows) and (C, amp) (columns), with the ratio to the plain ViT."
    saved, a = res["saved"], res["args"]
    key = lambda r: (r["model"], r["classes"], r["amp"])
    by = {key(r): r for r in saved}
    amps = [m for m in a["amp"]]
    head = "| model | C | " + " | ".join(f"{m} MiB | {m} × plain | {m} × reference" for m in amps) + " |"
    L = [f"Saved-for-backward bytes of one training forward (+ loss): {a['backbone']}, batch {a['batch']}, {a['img']} "
         "px (unique storages, parameters excluded)", "", head, "|---|---|" + "---|---|---|" * len(amps)]
    for i, C in enumerate(a["classes"]):
        for kind in ("weaktr_fast", "weaktr_fast_keep", "weaktr_fast_before", "weaktr_reference", "timm_vit"):
            if kind not in a["models"] or (kind == "timm_vit" and i): continue    # the plain ViT has no C: one row
            cells = []
            for m in amps:
                r = by.get(key(dict(model=kind, classes=None if kind == "timm_vit" else C, amp=m)))
                base = by.get(("timm_vit", None, m))
                ref = by.get(("weaktr_reference", C, m))
                if r is None:
                    cells += ["–"] * 3
                    continue
                cells += [f"{r['saved_mib']:.0f}", f"{r['saved_mib'] / base['saved_mib']:.2f}×" if base else "–",
                          f"{r['saved_mib'] / ref['saved_mib']:.2f}×" if ref else "–"]
            L.append(f"| {kind} | {C if kind != 'timm_vit' else '–'} | " + " | ".join(cells) + " |")
    if res.get("steps"):
        L += ["", f"Phase-1 train step of the fast path (AdamW): code before issue 14 (before), now (after), now with "
                  f"recompute_attn=False (keep), alternating steps "
                  f"({a['steps']} each after {a['warmup']} warm-up), median:", "",
              "| C | amp | batch | variant | CPU s/step | wall s/step | img/s | throughput vs before |",
              "|---|---|---|---|---|---|---|---|"]
        for s in res["steps"]:
            for k in ("before", "after", "keep"):
                L.append(f"| {s['classes']} | {s['amp']} | {s['batch']} | {k} | {s['cpu_s'][k]:.2f} | "
                         f"{s['step_s'][k]:.1f} | {s['img_per_s'][k]:.2f} | "
                         f"**{s['img_per_s'][k] / s['img_per_s']['before']:.2f}×** |")
        L += ["", f"img/s and the ratio use {res['steps'][0]['timed_by']}; wall-clock times on a shared machine mostly "
                  "measure its load."]
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--classes", type=int, nargs="+", default=[20, 90], help="C values (20 VOC, 90 COCO)")
    p.add_argument("--amp", nargs="+", choices=list(AMP), default=["off", "bf16"], help="autocast dtypes to count")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--steps", type=int, default=3, help="timed train steps per variant (0: no timing)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--step-amp", nargs="+", choices=list(AMP), default=["off"],
                   help="autocast dtypes of the timed steps")
    p.add_argument("--step-classes", type=int, default=20)
    add_process_args(p, "measurement")
    args = p.parse_args(argv)
    args.models = [k.strip() for k in args.models.split(",") if k.strip()]
    if bad := [k for k in args.models if k not in MODELS]:
        p.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    if args.threads: torch.set_num_threads(args.threads)
    dev = get_device(args.device)
    if args._child:                                       # one measurement in this fresh process, JSON on stdout
        what, C, amp = args._child.split(":")
        r = measure_steps(args, int(C), amp, dev) if what == "steps" else measure_saved(what, args, int(C), amp, dev)
        print(json.dumps(r))
        return
    isolate = args.isolate == "yes" or (args.isolate == "auto" and dev.type != "cuda")
    one = lambda spec: run_child(__file__, spec) if isolate else (
        lambda w, C, amp: measure_steps(args, int(C), amp, dev) if w == "steps"
        else measure_saved(w, args, int(C), amp, dev))(*spec.split(":"))
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
               timm=timm.__version__,
               python=platform.python_version(), device=str(dev), cpu_threads=torch.get_num_threads(),
               load_average_start=round(os.getloadavg()[0], 2))
    t0 = time.time()
    saved = []
    for amp in args.amp:
        for kind in args.models:
            for C in (args.classes if kind != "timm_vit" else [None]):
                r = one(f"{kind}:{C or 0}:{amp}")
                saved.append(r)
                print(f"{kind:20s} C={C!s:4s} {amp:4s} saved {r['saved_mib']:8.1f} MiB in {r['tensors']} storages",
                      flush=True)
    steps = [one(f"steps:{args.step_classes}:{amp}") for amp in args.step_amp] if args.steps > 0 else []
    env.update(load_average_end=round(os.getloadavg()[0], 2), wall_s=round(time.time() - t0, 1))
    res = dict(args={k: v for k, v in vars(args).items() if k != "_child"}, env=env, saved=saved, steps=steps)
    res["markdown"] = table(res)
    print(res["markdown"])
    if args.out:
        atomic_save_json(json.loads(json.dumps(res, default=str)), args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
