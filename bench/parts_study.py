"""Issue 17 study: does a backbone pretrained to group whole objects make WeakTr's refinement and AAF visible?

On the "parts" design (weaktr.synth.SYNTH_PARTS: a small class part on a body whose look is shared by several
classes, part-less distractor bodies as background), for each backbone variant:

1. own-object affinity mass of the pretrained backbone's patch->patch attention on the val split (all heads
   averaged, and the supervised "grouping" heads), beside the object's area share (a uniform row's mass);
2. a short Phase-1 run (weaktr.train_cam.train_cam, the demo's recipe with fewer epochs) from that backbone;
3. on the val split: CAM mIoU for fused (refined / unrefined), patchcam and cross (refined), the share of object
   area the CAM covers (foreground recall at each variant's best threshold), the trained model's fused and uniform
   own-object mass, and head_weight_std (std of the AAF weights over heads, averaged over images).

Variants: "palette" = the shipped asset (pretrained on the palette world); "parts_cls" = pretrained on the parts
pretraining set (SYNTH_PARTS_PRETRAIN) with part + body-texture labels; "parts_group" = the same plus the
attention-grouping loss (PretrainCfg.group_weight). Results (fractions) go to results/parts_study.json; every run,
failures included, is logged there. Runs are resumable (finished stages are reused).

    python bench/parts_study.py --variants palette,parts_cls,parts_group --pre-epochs 12 --cam-epochs 12
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from weaktr.camgen import cams_batched  # noqa: E402
from weaktr.core import atomic_save_json  # noqa: E402
from weaktr.metrics import miou, threshold_confusions  # noqa: E402
from weaktr.model import load_cam_model  # noqa: E402
from weaktr.pretrain import (DEMO_BACKBONE, AttentionTap, cpu_info, grid_groups, grouping_targets,  # noqa: E402
                             load_classifier, load_split_tensors, normalize_u8, own_object_mass, own_object_mass_of,
                             pretrain_backbone)
from weaktr.synth import SYNTH_PARTS, SYNTH_PARTS_PRETRAIN, make_synthetic_keyed, synthetic_dataset  # noqa: E402
from weaktr.train_cam import train_cam  # noqa: E402
from weaktr.zoo import DEMO_ASSET, asset_card, asset_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = {k: v for k, v in DEMO_BACKBONE.items() if k != "backbone"}
VARIANTS = dict(
    palette=dict(pretrain=None, note="shipped asset vit_synth_d128_l4_p8 (palette world, 8 part-free classes)"),
    parts_cls=dict(pretrain=dict(body_labels=True), note="parts pretraining set, part + body-texture labels"),
    parts_group=dict(pretrain=dict(body_labels=True, group_weight=1.0, group_blocks=2, group_heads=2),
                     note="parts pretraining set, labels + grouping loss on 2 heads x last 2 blocks"),
    parts_group_all=dict(pretrain=dict(body_labels=True, group_weight=1.0, group_blocks=4, group_heads=2),
                         note="labels + grouping loss on 2 heads of every block"),
    parts_group_strong=dict(pretrain=dict(body_labels=True, group_weight=3.0, group_blocks=4, group_heads=2),
                            note="labels + grouping loss (weight 3) on 2 heads of every block"),
    parts_group_heavy=dict(pretrain=dict(body_labels=True, group_weight=3.0, group_blocks=4, group_heads=3),
                           note="labels + grouping loss (weight 3) on 3 of 4 heads of every block"),
    parts_group_every=dict(pretrain=dict(body_labels=True, group_weight=3.0, group_blocks=4, group_heads=4),
                           note="labels + grouping loss (weight 3) on every head of every block"),
)
GROUP_BLOCKS, GROUP_HEADS = (2, 3), 2        # the heads reported as "grouping heads" for every backbone
THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 0.951, 0.05)]


def log(state, **kw):
    kw["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state["log"].append(kw)
    print(json.dumps(kw), flush=True)


def backbone_files(name, args, runs, data_pre, state):
    "-> (weights path, card dict) of a variant's backbone (pretraining it if needed)."
    v = VARIANTS[name]
    if v["pretrain"] is None: return asset_path(DEMO_ASSET), asset_card(DEMO_ASSET)
    cfg = dict(run_dir=str(runs / f"pre_{name}_e{args.pre_epochs}"), data_root=str(data_pre), epochs=args.pre_epochs,
               n_train=SYNTH_PARTS_PRETRAIN["n_train"], n_val=SYNTH_PARTS_PRETRAIN["n_val"], design="parts",
               num_classes=SYNTH_PARTS_PRETRAIN["num_classes"], max_objects=2, clutter=SYNTH_PARTS_PRETRAIN["clutter"],
               threads=args.threads, **ARCH, **v["pretrain"])
    t0 = time.time()
    s = pretrain_backbone(cfg)
    log(state, step="pretrain", variant=name, seconds=round(time.time() - t0, 1), val_map=s["val_map"],
        best_epoch=s["best_epoch"], config={k: cfg[k] for k in ("epochs", *v["pretrain"])})
    return Path(s["weights"]), json.loads(Path(s["card"]).read_text())


@torch.no_grad()
def cam_eval(model, ds, attention_type, refine):
    "mIoU curve over THRESHOLDS; at the best threshold: mIoU, foreground recall (object area covered)."
    NC = ds.num_classes + 1
    conf = np.zeros((len(THRESHOLDS), NC, NC), np.int64)
    for k in range(0, len(ds), 32):
        batch = [ds[i] for i in range(k, min(k + 32, len(ds)))]
        res = cams_batched(model, [b["image"] for b in batch], torch.stack([b["labels"] for b in batch]), scales=(1.0,),
                           attention_type=attention_type, refine=refine, compact=True)
        for b, (maps, cids) in zip(batch, res): conf += threshold_confusions(maps, cids, b["mask"], THRESHOLDS, NC)
    m = [miou(c)[0] for c in conf]
    i = int(np.nanargmax(m))
    c = conf[i]
    return dict(miou=float(m[i]), threshold=THRESHOLDS[i],
                fg_recall=float(np.trace(c[1:, 1:]) / c[1:].sum()),          # object pixels predicted as their class
                fg_precision=float(np.trace(c[1:, 1:]) / max(c[:, 1:].sum(), 1)))


@torch.no_grad()
def trained_affinity(model, imgs, masks):
    "Own-object mass of the trained WeakTr's fused (learned AAF) and uniform patch affinity; head_weight_std."
    out = dict(fused=[], uniform=[], share=[], hw_std=[], hw_mean=[])
    for i in range(0, len(imgs), 50):
        ins = model.inspect(normalize_u8(imgs[i:i + 50]))
        g = grid_groups(masks[i:i + 50].long(), model.patch_size)
        P = g.shape[1]
        rf = own_object_mass(ins.patch_affinity, g)
        ru = own_object_mass(ins.attn_stack.float().mean(1)[:, -P:, -P:], g)
        n = len(g)
        out["fused"].append((n, rf["own_mass"]))
        out["uniform"].append((n, ru["own_mass"]))
        out["share"].append((n, rf["own_share"]))
        out["hw_std"].append((n, ins.head_weights.float().std(1).mean().item()))
        out["hw_mean"].append((n, ins.head_weights.float().mean().item()))
    avg = lambda L: sum(n * v for n, v in L) / sum(n for n, _ in L)
    return dict(own_mass_fused=avg(out["fused"]), own_mass_uniform=avg(out["uniform"]), own_share=avg(out["share"]),
                head_weight_std=avg(out["hw_std"]), head_weight_mean=avg(out["hw_mean"]))


@torch.no_grad()
def head_diagnostics(wfile, card, imgs, masks):
    "Per block x head own-object mass of a backbone, and the grouping KL of object rows vs background rows."
    vit = load_classifier(wfile, card)
    nb, nh = len(vit.blocks), vit.blocks[0].attn.num_heads
    with AttentionTap(vit, range(nb), nh) as tap: vit(normalize_u8(imgs))
    g = grid_groups(masks.long(), ARCH["patch_size"])
    P, T, obj = g.shape[1], grouping_targets(g), g > 0
    mass = [[own_object_mass(tap.maps[b][:, h, -P:, -P:], g)["own_mass"] for h in range(nh)] for b in range(nb)]
    kl = {}
    for b in range(nb):
        a = tap.maps[b][:, :, -P:, -P:].clamp_min(1e-8)                        # (B, nh, P, P)
        r = (T[:, None] * (T[:, None].clamp_min(1e-8).log() - a.log())).sum(-1)  # (B, nh, P) row KL
        kl[b] = dict(object_rows=[r[:, h][obj].mean().item() for h in range(nh)],
                     background_rows=[r[:, h][~obj].mean().item() for h in range(nh)])
    return dict(own_mass_block_head=mass, row_kl=kl,
                cls_mass=[tap.maps[b][:, :, 1:, 0].mean().item() for b in range(nb)])


def diagnose(state, runs, data):
    "head_diagnostics of every backbone the study has pretrained (and the shipped asset) -> state['diagnostics']."
    imgs, masks, _ = load_split_tensors(data, "val")
    found = {"palette (shipped asset)": (asset_path(DEMO_ASSET), asset_card(DEMO_ASSET))}
    for d in sorted(runs.glob("pre_*_e*")):
        if (d / "card.json").is_file():
            found[d.name] = (d / "backbone.safetensors", json.loads((d / "card.json").read_text()))
    state["diagnostics"] = {k: head_diagnostics(w, c, imgs, masks) for k, (w, c) in found.items()}
    log(state, step="diagnose", backbones=list(found))


def run_variant(name, args, runs, data, data_pre, state):
    res = dict(variant=name, note=VARIANTS[name]["note"])
    wfile, card = backbone_files(name, args, runs, data_pre, state)
    res["backbone"] = dict(weights=str(wfile.relative_to(ROOT) if wfile.is_relative_to(ROOT) else wfile),
                           pretrain_val_map=card["metrics"]["val_map"],
                           grouping=card["training"].get("grouping"), body_labels=card["training"].get("body_labels"))
    imgs, masks, _ = load_split_tensors(data, "val")
    vit = load_classifier(wfile, card)
    res["backbone_affinity"] = own_object_mass_of(vit, imgs, masks, ARCH["patch_size"], GROUP_BLOCKS, GROUP_HEADS)
    log(state, step="backbone_affinity", variant=name, **res["backbone_affinity"])
    tc = dict(run_dir=str(runs / f"cam_{name}_pre{args.pre_epochs}_cam{args.cam_epochs}_lr{args.cam_lr:g}"),
              data="synthetic", data_root=str(data), backbone="vit_tiny_patch16_224",
              embed_dim=ARCH["embed_dim"], depth=ARCH["depth"], num_heads=ARCH["num_heads"],
              patch_size=ARCH["patch_size"], img_size=ARCH["img_size"], pretrained=str(wfile), device="cpu",
              train_split="train", val_split="val", cam_split="train", epochs=args.cam_epochs, batch_size=32,
              lr=args.cam_lr,
              warmup_epochs=1, weight_decay=0.05, drop_path=0.1, crop_scale=(0.35, 1.0), cam_eval_max_images=100,
              cam_t_range=(0.05, 0.95, 0.05), num_workers=0, eval_every=max(args.cam_epochs // 3, 1), progress=False)
    t0 = time.time()
    s = train_cam(tc)
    res["phase1"] = dict(epochs=args.cam_epochs, seconds=round(time.time() - t0, 1), best=s["best"]["value"],
                         best_epoch=s["best"]["epoch"], final=s["final"])
    log(state, step="train_cam", variant=name, **res["phase1"])
    model = load_cam_model(tc["run_dir"], device="cpu")
    ds = synthetic_dataset(data, "val", labels="masks")
    cams = {}
    for key, at, ref in (("fused_refined", "fused", True), ("fused_unrefined", "fused", False),
                         ("patchcam", "patchcam", True), ("cross", "cross", True),
                         ("patchcam_unrefined", "patchcam", False), ("cross_unrefined", "cross", False)):
        cams[key] = cam_eval(model, ds, at, ref)
    res["cams"] = cams
    res["trained_affinity"] = trained_affinity(model, imgs, masks)
    res["summary"] = dict(miou_refined=cams["fused_refined"]["miou"], miou_unrefined=cams["fused_unrefined"]["miou"],
                          miou_fused=cams["fused_refined"]["miou"], miou_patchcam=cams["patchcam"]["miou"],
                          miou_cross=cams["cross"]["miou"], coverage_unrefined=cams["fused_unrefined"]["fg_recall"],
                          coverage_refined=cams["fused_refined"]["fg_recall"],
                          head_weight_std=res["trained_affinity"]["head_weight_std"],
                          backbone_own_mass=res["backbone_affinity"]["val_own_mass_all"],
                          backbone_own_mass_grouping_heads=res["backbone_affinity"]["val_own_mass"],
                          own_share=res["backbone_affinity"]["val_own_share"],
                          trained_own_mass_fused=res["trained_affinity"]["own_mass_fused"])
    log(state, step="evaluate", variant=name, **res["summary"])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="palette,parts_cls,parts_group")
    ap.add_argument("--pre-epochs", type=int, default=12)
    ap.add_argument("--cam-epochs", type=int, default=12)
    ap.add_argument("--cam-lr", type=float, default=1e-3,
                    help="Phase-1 lr as written, scaled by batch/512 (CamTrainCfg's lr_scale_by_batch); the demo "
                         "does not scale, so its lr 1e-3 is --cam-lr 0.016 here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diagnose", action="store_true",
                    help="only: per-head own mass and row KL of the backbones in --runs")
    ap.add_argument("--runs", default="runs/parts_study")
    ap.add_argument("--out", default="results/parts_study.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.is_file() else dict(log=[], variants={})
    state.update(machine=cpu_info() | dict(python=platform.python_version(), torch=torch.__version__),
                 date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 command="python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
                 data=dict(wsss={k: list(v) if isinstance(v, tuple) else v for k, v in SYNTH_PARTS.items()},
                           pretrain={k: list(v) if isinstance(v, tuple) else v
                                     for k, v in SYNTH_PARTS_PRETRAIN.items()},
                           eval_split="val", thresholds=[THRESHOLDS[0], THRESHOLDS[-1], 0.05], scales=[1.0],
                           flip=True, crf=False),
                 metrics_doc=dict(
                     own_mass="mean over object patches of the patch-normalised attention row mass on the own object",
                     own_share="mean over object patches of the own object's share of the patches (uniform-row mass)",
                     coverage="foreground recall of the CAM at the variant's best background threshold",
                     head_weight_std="std of the AAF weights over the L*nh heads, averaged over val images"))
    data = make_synthetic_keyed(ROOT / "runs" / "data", **SYNTH_PARTS)
    data_pre = make_synthetic_keyed(ROOT / "runs" / "data", **SYNTH_PARTS_PRETRAIN)
    if args.diagnose:
        diagnose(state, runs, data)
        atomic_save_json(state, out)
        return
    for name in args.variants.split(","):
        t0 = time.time()
        try:
            r = run_variant(name, args, runs, data, data_pre, state)
            r["wall_s"] = round(time.time() - t0, 1)
            r["args"] = dict(pre_epochs=args.pre_epochs, cam_epochs=args.cam_epochs, cam_lr=args.cam_lr)
            r["command"], r["date"] = state["command"], state["date"]
            state["variants"][f"{name}@pre{args.pre_epochs}_cam{args.cam_epochs}_lr{args.cam_lr:g}"] = r
        except Exception as e:           # a failed variant is a result too: logged, the others still run
            log(state, step="failed", variant=name, error=f"{type(e).__name__}: {e}",
                trace=traceback.format_exc()[-800:])
        atomic_save_json(state, out)
    print(json.dumps({k: v.get("summary") for k, v in state["variants"].items()}, indent=1))


if __name__ == "__main__":
    main()
