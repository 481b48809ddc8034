"Segmenter: the §ckpt-phase2 key/shape table, checkpoint round trips, forward shapes, two outputs, gradients, loaders."
import pytest
import timm
import torch
import torch.nn.functional as F

from weaktr.core import atomic_torch_save, shared_data
from weaktr.decoder import ClipCfg, seg_loss
from weaktr.segmenter import (combine_two, create_segmenter, load_official_segmenter,
                              load_segmenter_encoder, resize_pos_embed)

TINY = dict(embed_dim=64, depth=2, num_heads=2)


def tiny_model(K=5, img_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    return create_segmenter("deit_small_patch16_224", num_classes=K, img_size=img_size, **TINY, **kw)


def spec_table(K=21, D=384, L=12, grid=30):
    "The key/shape table of method notes §ckpt-phase2."
    t = {"encoder.cls_token": (1, 1, D), "encoder.pos_embed": (1, 1 + grid * grid, D),
         "encoder.patch_embed.proj.weight": (D, 3, 16, 16), "encoder.patch_embed.proj.bias": (D,),
         "encoder.norm.weight": (D,), "encoder.norm.bias": (D,),
         "encoder.head.weight": (1000, D), "encoder.head.bias": (1000,),
         "decoder.cls_emb": (1, K, D), "decoder.proj_dec.weight": (D, D), "decoder.proj_dec.bias": (D,),
         "decoder.proj_patch": (D, D), "decoder.proj_classes": (D, D),
         "decoder.decoder_norm.weight": (D,), "decoder.decoder_norm.bias": (D,),
         "decoder.mask_norm.weight": (K,), "decoder.mask_norm.bias": (K,)}
    def block(pre):
        return {f"{pre}.norm1.weight": (D,), f"{pre}.norm1.bias": (D,), f"{pre}.norm2.weight": (D,),
                f"{pre}.norm2.bias": (D,),
                f"{pre}.attn.qkv.weight": (3 * D, D), f"{pre}.attn.qkv.bias": (3 * D,),
                f"{pre}.attn.proj.weight": (D, D), f"{pre}.attn.proj.bias": (D,),
                f"{pre}.mlp.fc1.weight": (4 * D, D), f"{pre}.mlp.fc1.bias": (4 * D,),
                f"{pre}.mlp.fc2.weight": (D, 4 * D), f"{pre}.mlp.fc2.bias": (D,)}
    for i in range(L): t |= block(f"encoder.blocks.{i}")
    for i in range(2): t |= block(f"decoder.blocks.{i}")
    return t


def test_vit_s_key_table_and_parameter_counts():
    model = create_segmenter("deit_small_patch16_224", num_classes=21, img_size=480)
    sd = model.state_dict()
    expected = spec_table()
    assert set(sd) == set(expected), (sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd)))
    bad = {k: (tuple(sd[k].shape), v) for k, v in expected.items() if tuple(sd[k].shape) != v}
    assert not bad, bad
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    assert round(n_enc / 1e6, 2) == 22.32 and round(n_dec / 1e6, 2) == 4.00          # method notes §segmenter
    assert model.decoder.blocks[0].attn.num_heads == 6 and model.encoder.norm.eps == 1e-5
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    # method notes §segmenter init of the decoder
    assert model.decoder.proj_dec.bias.abs().sum() == 0
    assert abs(model.decoder.proj_patch.std().item() - 384 ** -0.5) < 0.002
    assert abs(model.decoder.cls_emb.std().item() - 0.02) < 0.002                      # trunc-normal(0.02)
    assert abs(model.decoder.proj_dec.weight.std().item() - 0.02) < 0.002


def test_official_checkpoint_round_trip(tmp_path):
    m1 = tiny_model(seed=1).eval()
    opt = torch.optim.SGD(m1.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    atomic_torch_save({"model": m1.state_dict(), "optimizer": opt.state_dict(), "n_cls": 5, "epoch": 99,
                       "lr_scheduler": {"last_epoch": 3}}, tmp_path / "checkpoint.pth")
    m2 = tiny_model(seed=2).eval()
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad(): assert not torch.allclose(m1(x), m2(x))
    rep = load_official_segmenter(m2, tmp_path / "checkpoint.pth")
    assert rep.missing == [] and rep.unexpected == [] and "epoch=99" in rep.notes
    for k, v in m1.state_dict().items(): assert torch.equal(v, m2.state_dict()[k]), k
    with torch.no_grad(): torch.testing.assert_close(m1(x), m2(x), rtol=0, atol=0)


def test_official_checkpoint_errors(tmp_path):
    m = tiny_model()
    sd = m.state_dict()
    atomic_torch_save({"model": sd, "n_cls": 5}, tmp_path / "ok.pth")
    with pytest.raises(ValueError,
                       match=r"checkpoint n_cls=5 but the model has n_cls=21.*decoder.cls_emb: file \(1, 5, 64\) "
                             r"vs model \(1, 21, 64\)"):
        load_official_segmenter(tiny_model(K=21), tmp_path / "ok.pth")
    # without n_cls in the file, the shape check names the keys
    atomic_torch_save({"model": sd}, tmp_path / "no_ncls.pth")
    with pytest.raises(ValueError, match=r"decoder.cls_emb: file \(1, 5, 64\) vs model \(1, 21, 64\)"):
        load_official_segmenter(tiny_model(K=21), tmp_path / "no_ncls.pth")
    bad = dict(sd)
    bad.pop("decoder.proj_patch")
    bad["decoder.extra"] = torch.zeros(1)
    atomic_torch_save({"model": bad, "n_cls": 5}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['decoder.proj_patch'\]"):
        load_official_segmenter(tiny_model(), tmp_path / "bad.pth")
    atomic_torch_save(sd, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="'model' key"):
        load_official_segmenter(tiny_model(), tmp_path / "bare.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_segmenter(tiny_model(), tmp_path / "nope.pth")


@pytest.mark.parametrize("hw", [(17, 33), (64, 80), (100, 31), (16, 16)])
def test_forward_shapes_non_multiple(hw):
    m = tiny_model().eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 5, *hw)
        Hp, Wp = -(-hw[0] // 16) * 16, -(-hw[1] // 16) * 16                       # pad then crop
        torch.testing.assert_close(m(F.pad(x, (0, Wp - hw[1], 0, Hp - hw[0])))[..., :hw[0], :hw[1]], y)


def test_forward_two_consistent_and_combined():
    m = tiny_model().eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        mid, final = m.forward_two(x)
        torch.testing.assert_close(final, m(x), rtol=0, atol=0)
        assert mid.shape == final.shape and not torch.allclose(mid, final)
        P = combine_two(mid.softmax(1), final.softmax(1), weight=0.8)
        torch.testing.assert_close(P.sum(1), torch.full((2, 48, 40), 1.8))
        # mid is the decoder's output after its first block, upsampled the same way
        tokens, grid = m.encode(F.pad(x, (0, 8, 0, 0)))
        masks_mid, _ = m.decoder(tokens, grid, return_mid=True)
        torch.testing.assert_close(F.interpolate(masks_mid, size=(48, 48), mode="bilinear",
                                                 align_corners=False)[..., :40], mid)


def test_gradients_reach_encoder_and_decoder():
    m = tiny_model().train()
    x = torch.randn(2, 3, 40, 56)
    target = torch.randint(0, 5, (2, 40, 56))
    target[:, :5] = 255
    loss, _ = seg_loss(m(x), target, ClipCfg(start_value=100.0, window=8))
    loss.backward()
    for name, p in m.named_parameters():
        if name.startswith("encoder.head."): assert p.grad is None, name                 # unused ImageNet head
        else: assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pos_embed_resize_matches_reference_formula():
    "The Segmenter reference: F.interpolate(grid, size=(h, w), mode='bilinear') with the CLS row kept."
    pe = torch.randn(1, 1 + 30 * 30, 16)
    g = pe[0, 1:].reshape(1, 30, 30, -1).permute(0, 3, 1, 2)
    rows = F.interpolate(g, size=(33, 45), mode="bilinear").permute(0, 2, 3, 1).reshape(1, 33 * 45, -1)
    ref = torch.cat([pe[:, :1], rows], 1)
    torch.testing.assert_close(resize_pos_embed(pe, (30, 30), (33, 45)), ref, rtol=0, atol=0)
    m = tiny_model(img_size=64)
    # a grid different from 4x4 (even with the same token count) uses a resized table
    assert m.pos_embed_for((2, 8)).shape == (1, 17, 64)
    assert not torch.equal(m.pos_embed_for((2, 8)), m.encoder.pos_embed)


def test_load_encoder_from_deit_distilled_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    src = timm.create_model("deit_small_distilled_patch16_224", pretrained=False, **TINY)
    atomic_torch_save({"model": src.state_dict()}, tmp_path / "deit_d.pth")
    m = tiny_model(img_size=96)
    rep = load_segmenter_encoder(m, tmp_path / "deit_d.pth")
    assert "dist_token" in rep.dropped and "head_dist.weight" in rep.dropped
    assert rep.missing == [] and rep.unexpected == []
    # CLS row, dist row dropped
    torch.testing.assert_close(m.encoder.pos_embed.detach()[:, 0], src.pos_embed.detach()[:, 0])
    grid = src.pos_embed.detach()[:, 2:]
    want = resize_pos_embed(torch.cat([src.pos_embed[:, :1], grid], 1).detach(), (14, 14), (6, 6))[:, 1:]
    torch.testing.assert_close(m.encoder.pos_embed.detach()[:, 1:], want)
    # a timm state dict with a 21k-class head, as safetensors: head left at init, everything else loaded
    src2 = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=21843, **TINY)
    save_file({k: v.contiguous() for k, v in src2.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    head0 = m.encoder.head.weight.detach().clone()
    rep = load_segmenter_encoder(m, tmp_path / "vit.safetensors")
    assert rep.missing == ["encoder.head.bias", "encoder.head.weight"]
    assert sorted(rep.dropped) == ["head.bias", "head.weight"]
    assert torch.equal(m.encoder.head.weight, head0)
    assert torch.equal(m.encoder.blocks[1].attn.qkv.weight, src2.blocks[1].attn.qkv.weight)


def test_load_encoder_from_reference_phase1_checkpoint(tmp_path):
    "The recorded reference Phase-1 state dict (§ckpt-phase1 key names, C = 5 class tokens) initialises the encoder."
    try: path = shared_data("parity") / "phase1_tiny.pt"
    except FileNotFoundError as e: pytest.skip(str(e))
    if not path.exists(): pytest.skip(f"{path} not found")
    rec = torch.load(path, weights_only=True)
    cfg, sd = rec["config"], rec["state_dict"]
    atomic_torch_save({"model": sd, "epoch": 1}, tmp_path / "checkpoint_best_mIoU.pth")
    m = create_segmenter("deit_small_patch16_224", num_classes=21, img_size=160,
                         embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"])
    rep = load_segmenter_encoder(m, tmp_path / "checkpoint_best_mIoU.pth")
    C, g = cfg["num_classes"], cfg["img_size"] // 16
    assert rep.missing == ["encoder.head.bias", "encoder.head.weight"]
    assert rep.unexpected and all(k.startswith("adaptive_attention_fusion.") for k in rep.unexpected)
    assert rep.dropped == ["head.weight", "head.bias"]                                # the conv CAM head
    torch.testing.assert_close(m.encoder.cls_token.detach(), sd["cls_token"].mean(1, keepdim=True))
    torch.testing.assert_close(m.encoder.pos_embed.detach(),
                               resize_pos_embed(torch.cat([sd["pos_embed"][:, :C].mean(1, keepdim=True),
                                                           sd["pos_embed"][:, C:]], 1),
                                                (g, g), (10, 10)))
    for k in ("blocks.2.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "patch_embed.proj.weight", "norm.weight"):
        assert torch.equal(m.encoder.state_dict()[k], sd[k]), k
    with torch.no_grad(): assert m.eval()(torch.randn(1, 3, 75, 90)).shape == (1, 21, 75, 90)


def test_rejects_non_vit_and_pretrained():
    with pytest.raises(ValueError, match="pretrained=True"):
        create_segmenter("deit_small_patch16_224", 5, img_size=64, pretrained=True, **TINY)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        create_segmenter("resnet18", 5, img_size=64)
