"""Numerical parity of the Phase-1 WeakTr model with tensors recorded from the reference (hustvl/WeakTr).

The recorded file (shared data, `parity/phase1_tiny.pt`, see its README) holds a tiny reference model
(D=128, 3 blocks, 2 heads, C=5, 96 px, AAF V3 with reduction 2), two inputs (2x3x96x96 and 1x3x64x112; the second
needs the pos-embed interpolation of method notes §pos-embed) and the reference's eval-mode outputs.
Run `pytest -s tests/test_parity.py` to see the error table.
"""
import pytest
import torch

from weaktr.core import shared_data
from weaktr.model import create_weaktr, create_weaktr_from_checkpoint, load_official_state_dict

TOL = 1e-5
KEYS = ["cls_logits", "coarse_logits", "fine_logits", "cams", "cams_patchcam", "patch_affinity"]


@pytest.fixture(scope="module")
def parity():
    try:
        path = shared_data("parity") / "phase1_tiny.pt"
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not path.exists():
        pytest.skip(f"parity file not found: {path}")
    return torch.load(path, weights_only=True)


def build(cfg, impl):
    return create_weaktr("deit_tiny_patch16_224", cfg["num_classes"], fusion=cfg["fusion"], reduction=cfg["reduction"],
                         pool=cfg["pool"], feat_reduction=cfg["feat_reduction"], img_size=cfg["img_size"],
                         patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                         num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"],
                         attn_impl=impl)


def outputs(model, x):
    o = model(x)
    cams, aff = model.cams(x, "fused")
    cams_p, _ = model.cams(x, "patchcam")
    return dict(cls_logits=o.cls_logits, coarse_logits=o.coarse_logits, fine_logits=o.fine_logits,
                cams=cams, cams_patchcam=cams_p, patch_affinity=aff)


def rel_err(a, b):
    "max |a - b| / max |b|"
    return ((a.detach().double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_config_is_what_we_build(parity):
    cfg = parity["config"]
    assert cfg["ln_eps"] == 1e-6 and cfg["fusion"] == "v3"
    m = build(cfg, "fast")
    assert m.blocks[0].norm1.eps == cfg["ln_eps"] and m.norm.eps == cfg["ln_eps"]
    ref_sd = parity["state_dict"]
    ours = m.state_dict()
    assert list(ours) == list(ref_sd), "state-dict keys (and their order) differ from the reference's"
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


# fast path twice: without autograd (explicit probabilities reused for A@v) and with autograd (fused SDPA +
# no-grad probabilities), the reference path once.
@pytest.mark.parametrize("impl,grad", [("fast", False), ("fast", True), ("reference", False)])
def test_parity(parity, impl, grad):
    model = build(parity["config"], impl).eval()
    load_official_state_dict(model, parity["state_dict"], "parity/phase1_tiny.pt")
    worst = {}
    for i, (x, ref) in enumerate(zip(parity["inputs"], parity["outputs"])):
        with torch.set_grad_enabled(grad):
            got = outputs(model, x.clone().requires_grad_(grad))
        for k in KEYS:
            assert got[k].shape == ref[k].shape, (k, tuple(got[k].shape), tuple(ref[k].shape))
            e = rel_err(got[k], ref[k])
            worst[(i, k)] = e
    print(f"\nparity, attn_impl={impl}, autograd={grad}: max relative error per tensor")
    for (i, k), e in worst.items():
        print(f"  input {i} {tuple(parity['inputs'][i].shape)}  {k:15s} {e:.2e}")
    bad = {key: e for key, e in worst.items() if not e <= TOL}
    assert not bad, f"relative error above {TOL}: {bad}"


def test_parity_via_checkpoint_file(parity, tmp_path):
    "The recorded weights saved as an official checkpoint: create_weaktr_from_checkpoint infers the tiny config."
    torch.save({"model": parity["state_dict"], "epoch": 0}, tmp_path / "checkpoint_best_mIoU.pth")
    model = create_weaktr_from_checkpoint(tmp_path / "checkpoint_best_mIoU.pth",
                                          backbone="deit_tiny_patch16_224").eval()
    cfg = parity["config"]
    assert (model.num_classes, model.embed_dim, model.depth, model.num_heads) == \
        (cfg["num_classes"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"])
    assert model.config["reduction"] == cfg["reduction"] and model.config["img_size"] == cfg["img_size"]
    assert model.config["feat_reduction"] == cfg["feat_reduction"]
    with torch.no_grad():
        for x, ref in zip(parity["inputs"], parity["outputs"]):
            got = outputs(model, x)
            for k in KEYS:
                assert rel_err(got[k], ref[k]) <= TOL, k
