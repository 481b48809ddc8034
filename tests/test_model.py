"""Phase-1 WeakTr model: detach table (method notes §detach), fast vs reference attention, AAF variants, loaders."""
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from weaktr.fusion import fuse_heads, head_features, pool_tokens
from weaktr.model import (WeakTrOutput, create_weaktr, create_weaktr_from_checkpoint, load_official_checkpoint,
                          load_pretrained, refine_cam, weaktr_loss)

torch.set_num_threads(1)
NAME = "deit_tiny_patch16_224"
TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, reduction=2)
GROUP = {"cls_token": "backbone", "pos_embed": "backbone", "patch_embed": "backbone", "blocks": "backbone"}


def tiny(**kw):
    torch.manual_seed(0)
    return create_weaktr(NAME, kw.pop("num_classes", 3), **{**TINY, **kw})


def batch(B=2, H=64, W=64, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    y = (torch.rand(B, C, generator=g) > 0.5).float()
    y[:, 0] = 1
    return x, y


def grad_groups(model, loss):
    "Per parameter group: does `loss` give a non-zero gradient anywhere in it?"
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {}
    for n, p in model.named_parameters():
        g = GROUP.get(n.split(".")[0], n.split(".")[0])
        out[g] = out.get(g, False) or (p.grad is not None and bool(p.grad.abs().sum() > 0))
    return out


# ---------------------------------------------------------------- detach table (method notes §detach)
TABLE = {"cls_logits": dict(backbone=True, head=False, adaptive_attention_fusion=False, norm=False),
         "coarse_logits": dict(backbone=True, head=True, adaptive_attention_fusion=False, norm=False),
         "fine_logits": dict(backbone=False, head=False, adaptive_attention_fusion=True, norm=False)}


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("fusion", ["v3", "v2", "v1", "randweight"])
def test_detach_table(impl, fusion):
    model = tiny(attn_impl=impl, fusion=fusion).train()
    x, y = batch()
    for name, expected in TABLE.items():
        out = model(x)
        loss = F.multilabel_soft_margin_loss(getattr(out, name), y)
        assert grad_groups(model, loss) == expected, (fusion, impl, name)
    # finer: within the backbone, the class tokens and every block get a gradient from L_tok and L_coarse
    for name in ("cls_logits", "coarse_logits"):
        model.zero_grad(set_to_none=True)
        F.multilabel_soft_margin_loss(getattr(model(x), name), y).backward()
        for pname in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                      "blocks.1.mlp.fc2.weight"):
            p = dict(model.named_parameters())[pname]
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)


# ---------------------------------------------------------------- fast vs reference
@pytest.mark.parametrize("fusion", ["v3", "v1"])
def test_fast_and_reference_paths_agree(fusion):
    fast = tiny(attn_impl="fast", fusion=fusion, drop_path_rate=0.0).train()
    ref = tiny(attn_impl="reference", fusion=fusion, drop_path_rate=0.0).train()
    ref.load_state_dict(fast.state_dict())
    x, y = batch(H=64, W=80)
    outs, grads = [], []
    for m in (fast, ref):
        m.zero_grad(set_to_none=True)
        out = m(x)
        weaktr_loss(out, y).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    assert "norm.weight" not in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # the fast path keeps no attention map in the graph; the reference path does
    with torch.enable_grad():
        assert not fast.forward_features(x).attn_stack.requires_grad
        assert ref.forward_features(x).attn_stack.requires_grad


# ---------------------------------------------------------------- shapes and attention types
@pytest.mark.parametrize("fusion", ["v3", "v2", "v1", "randweight"])
def test_shapes(fusion):
    model = tiny(fusion=fusion).eval()
    for H, W in [(64, 64), (48, 96), (70, 41)]:
        x, _ = batch(B=2, H=H, W=W)
        h, w = model.grid(H, W)
        P, N = h * w, 3 + h * w
        with torch.no_grad():
            out = model(x)
            assert isinstance(out, WeakTrOutput) and all(o.shape == (2, 3) for o in out)
            for t in ("fused", "patchcam", "cross"):
                cams, aff = model.cams(x, t)
                assert cams.shape == (2, 3, h, w) and aff.shape == (2, P, P)
        ins = model.inspect(x)
        assert ins.attn_stack.shape == (2, 4, N, N) and ins.head_weights.shape == (2, 4)
        for k in ("cam_coarse", "cls_patch_attn", "cams", "cam_fine"):
            assert getattr(ins, k).shape == (2, 3, h, w), k
        assert ins.patch_affinity.shape == (2, P, P) and ins.grid == (h, w)
        assert model.head_weights(x).shape == (2, 4)
    # attention types relate as the spec says
    x, _ = batch()
    with torch.no_grad():
        fused, _ = model.cams(x, "fused")
        patch, _ = model.cams(x, "patchcam")
        cross, _ = model.cams(x, "cross")
    torch.testing.assert_close(fused, cross * patch)
    assert (patch >= 0).all()


def test_v2_reads_block_outputs_v3_the_attention_branch():
    model = tiny(fusion="v2").eval()
    x, _ = batch()
    with torch.no_grad():
        bo = model.forward_features(x)                     # block_feats = (a_k, x_k) per block
        s_v2 = model.adaptive_attention_fusion.summarize(bo.attn_stack[:, :2], *bo.block_feats[0])
    torch.testing.assert_close(s_v2, pool_tokens(head_features(bo.block_feats[0][1], 2), "avg"))


def test_v1_avg_weights_do_not_depend_on_the_image():
    model = tiny(fusion="v1", pool="avg").eval()
    x1, _ = batch(seed=1)
    x2, _ = batch(seed=2)
    with torch.no_grad():
        w1, w2 = model.head_weights(x1), model.head_weights(x2)
        torch.testing.assert_close(w1, w2, rtol=0, atol=1e-6)
        torch.testing.assert_close(w1[0], w1[1], rtol=0, atol=1e-6)
        w_other_size = model.head_weights(batch(H=96, W=96)[0])         # another token count N: other weights
    assert (w_other_size - w1).abs().max() > 1e-6
    model.adaptive_attention_fusion.pool = "max"
    with torch.no_grad():
        assert (model.head_weights(x1) - model.head_weights(x2)).abs().max() > 1e-5
    # V3 weights are image-dependent
    v3 = tiny(fusion="v3").eval()
    with torch.no_grad():
        assert (v3.head_weights(x1) - v3.head_weights(x2)).abs().max() > 1e-6


def test_randweight_query_is_a_buffer_in_the_state_dict(tmp_path):
    model = tiny(fusion="randweight").eval()
    sd = model.state_dict()
    assert "adaptive_attention_fusion.query" in sd and sd["adaptive_attention_fusion.query"].shape == (1, 4)
    assert "adaptive_attention_fusion.query" not in dict(model.named_parameters())
    x, _ = batch()
    with torch.no_grad():
        w = model.head_weights(x)
    torch.testing.assert_close(w[0], w[1])                                  # the same for every image
    torch.save({"model": sd}, tmp_path / "rw.pth")
    other = tiny(fusion="randweight")
    with torch.no_grad():
        other.adaptive_attention_fusion.query.normal_()
    load_official_checkpoint(other, tmp_path / "rw.pth")
    torch.testing.assert_close(other.adaptive_attention_fusion.query, model.adaptive_attention_fusion.query)
    # a reference-style RandWeight file: no query in the state dict, query.npy beside it
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    torch.save({"model": {k: v for k, v in sd.items() if not k.endswith("query")}}, ref_dir / "checkpoint.pth")
    with pytest.raises(FileNotFoundError, match="query.npy"):
        load_official_checkpoint(tiny(fusion="randweight"), ref_dir / "checkpoint.pth")
    np.save(ref_dir / "query.npy", sd["adaptive_attention_fusion.query"].numpy())
    m3 = tiny(fusion="randweight")
    rep = load_official_checkpoint(m3, ref_dir / "checkpoint.pth")
    assert any("query.npy" in n for n in rep.notes)
    torch.testing.assert_close(m3.adaptive_attention_fusion.query, model.adaptive_attention_fusion.query)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_mismatches(tmp_path):
    model = tiny().eval()
    path = tmp_path / "checkpoint_best_mIoU.pth"
    torch.save({"model": model.state_dict(), "epoch": 7, "miou": 60.0}, path)
    other = tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    rep = load_official_checkpoint(other, path)
    assert rep.missing == [] and rep.unexpected == []
    x, _ = batch()
    with torch.no_grad():
        for a, b in zip(model(x), other.eval()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a bare state dict works too
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    load_official_checkpoint(tiny(), tmp_path / "bare.pth")
    # class count
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 3, 64\) in the file but \(1, 20, 64\)"):
        load_official_checkpoint(tiny(num_classes=20), path)
    # variant: a V3 file into a V1 model and a V1 file into a V3 model
    with pytest.raises(ValueError, match="holds AAF v3 weights"):
        load_official_checkpoint(tiny(fusion="v1"), path)
    torch.save({"model": tiny(fusion="v1").state_dict()}, tmp_path / "v1.pth")
    with pytest.raises(ValueError, match=r"holds AAF v1 weights \['adaptive_attention_fusion.fc.0.weight'"):
        load_official_checkpoint(tiny(), tmp_path / "v1.pth")
    # embedding dim
    with pytest.raises(ValueError, match=r"in the file but \(1, 3, 32\)"):
        load_official_checkpoint(tiny(embed_dim=32), path)
    # AAF reduction
    with pytest.raises(ValueError,
                       match=r"adaptive_attention_fusion.attn_head_ffn.0.weight has shape \(2, 4\) in "
                             r"the file but \(4, 4\)"):
        load_official_checkpoint(tiny(reduction=1), path)
    # missing / unexpected keys
    sd = model.state_dict()
    sd.pop("norm.bias")
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \['norm.bias'\]"):
        load_official_checkpoint(tiny(), tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_checkpoint(tiny(), tmp_path / "nope.pth")


@pytest.mark.parametrize("fusion,reduction", [("v3", 2), ("v3", 4), ("v1", 2), ("randweight", 1)])
def test_create_from_checkpoint_infers_the_config(tmp_path, fusion, reduction):
    model = tiny(fusion=fusion, reduction=reduction, num_classes=4, img_size=48).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "c.pth")
    m2 = create_weaktr_from_checkpoint(tmp_path / "c.pth", backbone=NAME).eval()
    assert (m2.num_classes, m2.src_grid, m2.fusion, m2.config["reduction"]) == (4, (3, 3), fusion, reduction)
    x, _ = batch(H=48, W=48, C=4)
    with torch.no_grad():
        for a, b in zip(model(x), m2(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- ImageNet weights
def _vit(**kw):
    torch.manual_seed(1)
    return timm.create_model(NAME, pretrained=False, num_classes=1000,
                             **{k: v for k, v in TINY.items() if k != "reduction"}, **kw)


@pytest.mark.parametrize("fmt", ["deit", "timm", "safetensors"])
def test_load_pretrained(tmp_path, fmt):
    vit = _vit()
    sd = vit.state_dict()
    path = tmp_path / {"deit": "deit.pth", "timm": "vit.pth", "safetensors": "vit.safetensors"}[fmt]
    if fmt == "deit":
        torch.save({"model": sd}, path)
    elif fmt == "timm":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    model = tiny()
    rep = load_pretrained(model, path)
    aaf = [f"adaptive_attention_fusion.{k}" for k in model.adaptive_attention_fusion.state_dict()]
    assert sorted(rep.missing) == sorted(["head.weight", "head.bias"] + aaf)
    assert rep.unexpected == [] and sorted(rep.dropped) == ["head.bias", "head.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model.cls_token, vit.cls_token.expand(1, 3, 64), rtol=0, atol=0)
        assert torch.equal(model.cls_token[0, 0], model.cls_token[0, 2])          # class tokens start identical
        torch.testing.assert_close(model.pos_embed[:, :3], vit.pos_embed[:, :1].expand(1, 3, 64), rtol=0, atol=0)
        torch.testing.assert_close(model.pos_embed[:, 3:], vit.pos_embed[:, 1:], rtol=0, atol=0)
        for k, v in sd.items():
            if k not in ("cls_token", "pos_embed", "head.weight", "head.bias"):
                torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # create_weaktr(pretrained=...) does the same
    m2 = create_weaktr(NAME, 3, pretrained=path, **TINY)
    assert sorted(m2.pretrained_report.missing) == sorted(rep.missing)


def test_load_pretrained_resizes_grid_and_handles_distilled(tmp_path):
    vit = _vit()
    sd = dict(vit.state_dict())
    # DeiT-distilled layout: a dist token and a second position row, plus head_dist
    sd["dist_token"] = torch.randn(1, 1, 64)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.randn(1, 1, 64), sd["pos_embed"][:, 1:]], 1)
    sd["head_dist.weight"], sd["head_dist.bias"] = torch.randn(1000, 64), torch.randn(1000)
    torch.save({"model": sd}, tmp_path / "distilled.pth")
    model = create_weaktr(NAME, 3, **{**TINY, "img_size": 96})                 # 6x6 grid from a 4x4 file
    rep = load_pretrained(model, tmp_path / "distilled.pth")
    assert set(rep.dropped) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "dist_token"}
    assert model.pos_embed.shape == (1, 3 + 36, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.pos_embed[:, :3], sd["pos_embed"][:, :1].expand(1, 3, 64), rtol=0, atol=0)
    assert any("4x4 -> 6x6" in n for n in rep.notes)


def test_load_pretrained_errors(tmp_path):
    sd = dict(_vit().state_dict())
    sd.pop("blocks.1.attn.qkv.weight")
    sd["fc_norm.weight"] = torch.ones(64)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="blocks.1.attn.qkv.weight"):
        load_pretrained(tiny(), tmp_path / "broken.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = load_pretrained(tiny(), tmp_path / "broken.pth", strict=False)
    assert "blocks.1.attn.qkv.weight" in rep.missing and rep.unexpected == ["fc_norm.weight"]
    assert len(w) == 2
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, tmp_path / "small.pth")          # weights of a narrower ViT
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 1, 32\), expected \(1, 1, 64\)"):
        load_pretrained(tiny(), tmp_path / "small.pth")
    torch.save({"model": {"a": "not a tensor"}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        load_pretrained(tiny(), tmp_path / "junk.pth")


# ---------------------------------------------------------------- misc
def test_loss_and_refinement():
    model = tiny().train()
    x, y = batch()
    out = model(x)
    loss = weaktr_loss(out, y)
    manual = sum(-(y * F.logsigmoid(o) + (1 - y) * F.logsigmoid(-o)).mean() for o in out)
    torch.testing.assert_close(loss, manual)
    loss.backward()
    with torch.no_grad():
        ins = model.eval().inspect(x)
    torch.testing.assert_close(ins.logits.fine_logits, refine_cam(ins.cams, ins.patch_affinity).mean((-2, -1)))
    torch.testing.assert_close(fuse_heads(ins.attn_stack, ins.head_weights)[:, 3:, 3:], ins.patch_affinity)


def test_final_norm_never_used():
    model = tiny().eval()
    x, _ = batch()
    with torch.no_grad():
        a = model(x)
        model.norm.weight.mul_(5)
        model.norm.bias.add_(3)
        b = model(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_bf16_autocast_forward_backward():
    model = tiny().train()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = weaktr_loss(out, y)
    loss.backward()
    assert torch.isfinite(loss) and model.adaptive_attention_fusion.attn_head_ffn[0].weight.grad is not None


@pytest.mark.parametrize("name,kw", [("vit_small_patch16_224", dict(embed_dim=48, depth=1, num_heads=3)),
                                     ("vit_base_patch8_224", dict(embed_dim=32, depth=1, num_heads=2, img_size=32)),
                                     ("deit_base_patch16_224", dict(embed_dim=32, depth=2, num_heads=4, img_size=48))])
def test_other_timm_backbones(name, kw):
    torch.manual_seed(0)
    model = create_weaktr(name, 2, reduction=1, **{"img_size": 64, **kw}).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        out = model(x)
    assert out.cls_logits.shape == (1, 2)
    assert set(k.split(".")[0] for k in model.state_dict()) == \
        {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "head", "adaptive_attention_fusion"}


def test_deit_small_matches_the_spec_table():
    "§ckpt-phase1: DeiT-S, C=20: key set, shapes and trainable-parameter counts (r=4: 21,752,517; r=8: 21,751,221)."
    for r, n in [(4, 21_752_517), (8, 21_751_221)]:
        model = create_weaktr("deit_small_patch16_224", 20, reduction=r)
        assert sum(p.numel() for p in model.parameters()) == n
    sd = model.state_dict()
    expect = {"cls_token": (1, 20, 384), "pos_embed": (1, 216, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
              "blocks.11.attn.qkv.weight": (1152, 384), "blocks.11.mlp.fc1.weight": (1536, 384), "norm.weight": (384,),
              "head.weight": (20, 384, 3, 3), "head.bias": (20,),
              "adaptive_attention_fusion.attn_head_ffn.0.weight": (9, 72),
              "adaptive_attention_fusion.attn_head_ffn.2.weight": (72, 9),
              "adaptive_attention_fusion.attn_feat_ffn.0.weight": (8, 64),
              "adaptive_attention_fusion.attn_feat_ffn.1.weight": (1, 8)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 2 + 2 + 12 * 12 + 2 + 2 + 6
    assert model.blocks[0].norm1.eps == 1e-6 and model.blocks[0].attn.scale == 64 ** -0.5
    assert [round(float(b.drop_path1.drop_prob), 4) if hasattr(b.drop_path1, "drop_prob") else 0.0
            for b in model.blocks][::11] == [0.0, 0.1]
