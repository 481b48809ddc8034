"GC loss: parity with the reference's recorded outputs, invariants, window/padding semantics; decoder basics."
import pytest
import torch
import torch.nn.functional as F

from weaktr.core import shared_data
from weaktr.decoder import ClipCfg, MaskTransformer, clip_loss_map, seg_loss


def _gc_cases():
    try: path = shared_data("parity") / "gc_loss.pt"
    except FileNotFoundError as e: return [pytest.param(None, marks=pytest.mark.skip(reason=str(e)))]
    if not path.exists(): return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} not found"))]
    cases = torch.load(path, weights_only=True)
    return [pytest.param(c, id=f"case{i}-{tuple(c['loss_map'].shape)}-s{c['start_value']}-K{c['window']}")
            for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", _gc_cases())
def test_gc_parity(case):
    out = clip_loss_map(case["loss_map"], case["start_value"], case["window"])
    assert out.shape == case["clipped"].shape
    torch.testing.assert_close(out, case["clipped"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.mean(), case["clipped"].mean(), rtol=0, atol=1e-7)


def _reference_transcription(loss, start_value, K):
    "The reference's formula, written out literally (valid only for H, W multiples of K)."
    d = loss.detach().clone()
    mu = d.mean()
    if mu > start_value: return loss
    b, h, w = d.shape
    m = F.avg_pool2d(d.mean(0)[None, None], K, stride=K, padding=h % K, count_include_pad=False)[:, 0]
    m = torch.maximum(m, mu).repeat_interleave(b, 0).repeat_interleave(K, 1).repeat_interleave(K, 2)
    return torch.clamp(loss - m, None, 0) + m


@pytest.mark.parametrize("shape,K", [((4, 96, 96), 24), ((1, 48, 72), 24), ((3, 40, 40), 40), ((2, 30, 60), 10)])
def test_matches_reference_formula_divisible(shape, K):
    g = torch.Generator().manual_seed(sum(shape) + K)
    loss = torch.rand(shape, generator=g) ** 4 * 2
    loss[..., : shape[1] // 5, :] = 0                                   # ignored rows
    torch.testing.assert_close(clip_loss_map(loss, 1.2, K), _reference_transcription(loss, 1.2, K), rtol=0, atol=0)


@pytest.mark.parametrize("shape,K", [((2, 50, 37), 16), ((1, 7, 130), 120), ((3, 33, 33), 32)])
def test_non_divisible_windows_average_valid_pixels(shape, K):
    g = torch.Generator().manual_seed(K)
    loss = torch.rand(shape, generator=g) ** 3
    B, H, W = shape
    mu = loss.mean()
    mean_map = loss.mean(0)
    tau = torch.empty(H, W)
    for i in range(0, H, K):
        for j in range(0, W, K):
            tau[i:i + K, j:j + K] = torch.maximum(mean_map[i:i + K, j:j + K].mean(), mu)
    torch.testing.assert_close(clip_loss_map(loss, 5.0, K), torch.minimum(loss, tau.expand(B, H, W)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_invariants_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    loss = (torch.rand(2, 64, 48, generator=g) ** 3 * 3).requires_grad_()
    out = clip_loss_map(loss, 1.2, 16)
    assert (out - loss).max() <= 1e-6                                   # never increases (up to one rounding)
    out.sum().backward()
    grad = loss.grad
    assert set(grad.unique().tolist()) == {0.0, 1.0}
    capped = grad == 0
    assert capped.any() and (~capped).any()
    # capped pixels all sit at their window's threshold, which is >= mu
    assert (out[capped] >= loss.detach().mean() - 1e-6).all()
    assert ((out - loss)[~capped].abs() <= 1e-6).all()


def test_identity_above_start_and_equality_boundary():
    loss = torch.full((2, 8, 8), 2.0, requires_grad=True)
    out = clip_loss_map(loss, 1.2, 4)
    assert torch.equal(out, loss)
    # mu == start value: GC is on (the reference tests `mu > start`); a flat map equals its threshold,
    # and a pixel exactly at the threshold keeps its gradient (clamp passes at equality).
    loss = torch.full((1, 8, 8), 1.2, requires_grad=True)
    out = clip_loss_map(loss, 1.2, 4)
    out.sum().backward()
    assert torch.equal(out.detach(), loss.detach()) and torch.equal(loss.grad, torch.ones_like(loss))
    # exact tie: left window all 1.0 (mean 1 = tau exactly, mu = 0.5), right window 0 and one capped pixel
    loss = torch.tensor([[[1., 1., 0., 0.], [1., 1., 0., 0.]]])
    loss[0, 0, 3] = 0.8
    loss.requires_grad_()
    out = clip_loss_map(loss, 1.2, 2)
    out.sum().backward()
    tau_right = torch.maximum(torch.tensor(0.2), loss.detach().mean())
    assert torch.equal(out.detach()[0, :, :2], torch.ones(2, 2))
    assert torch.equal(out.detach()[0, 0, 3], tau_right)
    assert torch.equal(loss.grad[0], torch.tensor([[1., 1., 1., 0.], [1., 1., 1., 1.]]))


def test_window_edges():
    "Each KxK window is judged on its own mean: a hot window keeps its (high) values, a cold one is capped."
    loss = torch.zeros(1, 8, 8)
    loss[0, :4, :4] = 3.0                                               # hot window, uniform: tau = 3, nothing capped
    loss[0, 4:, 4:] = 0.1
    loss[0, 7, 7] = 2.0                                                 # cold window with one outlier
    mu = loss.mean()
    out = clip_loss_map(loss, 1.2, 4)
    assert torch.equal(out[0, :4, :4], loss[0, :4, :4])
    win = loss[0, 4:, 4:].mean()
    assert torch.isclose(out[0, 7, 7], torch.maximum(win, mu))
    assert torch.equal(out[0, 4:, :4], loss[0, 4:, :4])                # zeros stay zero


def test_seg_loss_reduction_and_gc():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 32, 32, requires_grad=True)
    target = torch.randint(0, 5, (2, 32, 32))
    target[:, :, :8] = 255
    loss, lmap = seg_loss(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255, reduction="none").mean())
    loss_gc, lmap2 = seg_loss(logits, target, ClipCfg(start_value=100.0, window=16))
    torch.testing.assert_close(lmap2, lmap)
    torch.testing.assert_close(loss_gc, clip_loss_map(lmap, 100.0, 16).mean())
    loss_gc.backward()
    assert logits.grad.abs().sum() > 0
    assert logits.grad[:, :, :, :8].abs().sum() == 0                    # ignored pixels give no gradient
    with pytest.raises(ValueError, match="target has values"): seg_loss(logits, torch.full_like(target, 7))
    with pytest.raises(TypeError, match="integer labels"): seg_loss(logits, target.float())


def test_mask_transformer_two_outputs_and_train_mode():
    torch.manual_seed(0)
    dec = MaskTransformer(n_cls=4, d_encoder=32, n_layers=3, n_heads=2, d_model=64, d_ff=128)
    x = torch.randn(2, 6 * 7, 32)
    dec.eval()
    with torch.no_grad():
        mid, final = dec(x, (6, 7), return_mid=True)
        assert torch.equal(final, dec(x, (6, 7)))
        h = torch.cat([dec.proj_dec(x), dec.cls_emb.expand(2, -1, -1)], 1)
        for blk in dec.blocks[:-1]: h = blk(h)                         # "before the last block" (reference)
        torch.testing.assert_close(dec.masks_from_tokens(h, (6, 7)), mid)
    dec.train()
    a, b = dec(x, (6, 7)), dec(x, (6, 7))
    assert not torch.equal(a, b)                                        # dropout 0.1 is active in training
    a.sum().backward()
    assert all(p.grad is not None for p in dec.parameters())
