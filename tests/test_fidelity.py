"""Issue 15: the paths users start from follow the reference by default: a foreign position grid is resized with the
reference's `--finetune` formula (Phase 1), and Phase 2 normalises with the statistics of the backbone family."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from weaktr.model import create_weaktr, load_pretrained, resize_pos_grid

torch.set_num_threads(1)


def reference_finetune_pos(pos_embed_checkpoint, C, new_size):
    "WeakTr main.py --finetune (DeiT's recipe, the CLS row repeated C times): the formula the loader must reproduce."
    D = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - 1) ** 0.5)
    extra_tokens = pos_embed_checkpoint[:, :1].repeat(1, C, 1)
    pos_tokens = pos_embed_checkpoint[:, 1:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, D).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


@pytest.fixture(scope="module")
def deit_s_files(tmp_path_factory):
    "DeiT-S-like state dicts (random timm models, no downloads) at 384 px (24x24 grid) and 224 px (14x14)."
    d = tmp_path_factory.mktemp("deit")
    out = {}
    for size in (384, 224):
        torch.manual_seed(size)
        vit = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=size)
        with torch.no_grad(): vit.pos_embed.normal_(0, 0.02)          # perturbed, as a trained grid is not constant
        torch.save({"model": vit.state_dict()}, d / f"deit_s_{size}.pth")
        out[size] = (d / f"deit_s_{size}.pth", vit.pos_embed.detach().clone())
    return out


def test_foreign_grid_is_resized_like_the_reference(deit_s_files):
    path, pe = deit_s_files[384]
    assert pe.shape == (1, 1 + 24 * 24, 384)
    torch.manual_seed(0)
    m = create_weaktr("deit_small_patch16_224", 20)
    rep = load_pretrained(m, path)
    want = reference_finetune_pos(pe, 20, 14)
    assert torch.equal(m.pos_embed.detach(), want)                      # bit-identical to the reference formula
    assert "24x24 -> 14x14 (bicubic, reference)" in " ".join(rep.notes)


def test_timm_resize_is_a_named_option_and_differs(deit_s_files):
    path, pe = deit_s_files[384]
    m = create_weaktr("deit_small_patch16_224", 20)
    load_pretrained(m, path, pos_resize="timm")
    want = reference_finetune_pos(pe, 20, 14)
    got = m.pos_embed.detach()
    assert torch.equal(got[:, :20], want[:, :20])                       # class rows: the same either way
    rel = float((got[:, 20:] - want[:, 20:]).abs().max() / want[:, 20:].abs().max())
    assert rel > 0.3                                                    # antialiasing changes a shrunk grid a lot
    with pytest.raises(ValueError, match="pos_resize"):
        load_pretrained(m, path, pos_resize="bilinear")


def test_same_grid_unchanged(deit_s_files):
    path, pe = deit_s_files[224]
    for method in ("reference", "timm"):
        m = create_weaktr("deit_small_patch16_224", 20)
        load_pretrained(m, path, pos_resize=method)
        assert torch.equal(m.pos_embed.detach()[:, 20:], pe[:, 1:])
        assert torch.equal(m.pos_embed.detach(), reference_finetune_pos(pe, 20, 14))


def test_resize_pos_grid_non_square_target():
    torch.manual_seed(0)
    g = torch.randn(1, 6 * 6, 8)
    out = resize_pos_grid(g, (6, 6), (4, 5))
    want = F.interpolate(g.reshape(1, 6, 6, 8).permute(0, 3, 1, 2), size=(4, 5), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 20, 8)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="expected 6x6"):
        resize_pos_grid(g[:, :30], (6, 6), (4, 4))
