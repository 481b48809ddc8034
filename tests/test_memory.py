"""Phase-1 activation memory (issue 14): the fast path keeps no copy of the attention stack for backward, and its
gradients are the reference path's. Saved bytes are counted with bench/bench_memory.py's own counter (sizes, no
timing)."""
import importlib.util

import pytest
import torch

from weaktr.core import REPO_ROOT
from weaktr.model import create_weaktr, weaktr_loss

torch.set_num_threads(1)
NAME = "deit_tiny_patch16_224"
TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, reduction=2, drop_path_rate=0.0)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO_ROOT / "bench" / "bench_memory.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


BENCH = _bench()


def _grads(model, x, y, amp=None, previous=False):
    "One forward + backward: -> {name: grad} for every parameter that gets one."
    model.zero_grad(set_to_none=True)
    with BENCH.previous_code(previous), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss = weaktr_loss(model(x), y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(fusion="v3", **kw):
    torch.manual_seed(0)
    fast = create_weaktr(NAME, 3, fusion=fusion, attn_impl="fast", **{**TINY, **kw}).train()
    ref = create_weaktr(NAME, 3, fusion=fusion, attn_impl="reference", **{**TINY, **kw}).train()
    ref.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 80, generator=g)
    y = (torch.rand(2, 3, generator=g) > 0.5).float()
    y[:, 0] = 1
    return fast, ref, x, y


@pytest.mark.parametrize("fusion", ["v3", "v1", "randweight"])
def test_gradients_equal_reference_fp32(fusion):
    fast, ref, x, y = _pair(fusion)
    gf, gr = _grads(fast, x, y), _grads(ref, x, y)
    assert gf.keys() == gr.keys()
    aaf = [n for n in gf if n.startswith("adaptive_attention_fusion.")]
    assert aaf and all(gf[n].abs().sum() > 0 for n in aaf)             # the head-weight gradient really flows
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    gp = _grads(fast, x, y, previous=True)                             # the code before issue 14, same model
    for n in gf:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_keeping_the_stack_gives_the_same_gradients():
    fast, ref, x, y = _pair()
    torch.manual_seed(0)
    keep = create_weaktr(NAME, 3, attn_impl="fast", recompute_attn=False, **TINY).train()
    keep.load_state_dict(fast.state_dict())
    assert keep.config["recompute_attn"] is False
    with torch.enable_grad(): assert keep.forward_features(x).attn_recompute is None
    gk, gf = _grads(keep, x, y), _grads(fast, x, y)
    for n in gf:
        torch.testing.assert_close(gk[n], gf[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_gradients_close_under_bf16():
    fast, ref, x, y = _pair()
    exact = _grads(ref, x, y)                                          # fp32 reference
    gf, gr = _grads(fast, x, y, torch.bfloat16), _grads(ref, x, y, torch.bfloat16)
    gp = _grads(fast, x, y, torch.bfloat16, previous=True)
    assert gf.keys() == gr.keys() == exact.keys()
    for n in gf:
        # same bf16 maps as the previous code (recomputed bit for bit), only the fp32 summation order differs
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-3, atol=1e-6, msg=lambda m: f"{n}: {m}")
        # and within the reference path's own bf16 noise around the fp32 gradient
        err_fast, err_ref = (gf[n] - exact[n]).norm(), (gr[n] - exact[n]).norm()
        assert err_fast <= 2 * err_ref + 1e-2 * exact[n].norm() + 1e-8, (n, float(err_fast), float(err_ref))


# a size where the attention stack is a large part of the activations: N = 3 + 64 tokens, D = 32, 4 heads
SMALL = dict(img_size=128, embed_dim=32, depth=2, num_heads=4, reduction=2, drop_path_rate=0.0)


def _saved(kind, amp, previous=False, **kw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    if kind == "timm":
        import timm
        model = timm.create_model(NAME, pretrained=False, num_classes=1000, img_size=128, embed_dim=32, depth=2,
                                  num_heads=4).train()
        loss_fn = lambda out: torch.nn.functional.cross_entropy(out.float(), torch.tensor([1, 2]))
    else:
        model = create_weaktr(NAME, 3, attn_impl=kind, **SMALL, **kw).train()
        loss_fn = lambda out: weaktr_loss(out, torch.tensor([[1., 0, 1], [0, 1, 0]]))

    def fwd():
        with BENCH.previous_code(previous), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            return loss_fn(model(x))
    return BENCH.saved_tensor_bytes(fwd, exclude=list(model.parameters()))[0]["bytes"]


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fast_path_saves_no_attention_stack(amp):
    B, N, L, nh = 2, 3 + 64, 2, 4
    stack = B * L * nh * N * N * 4                                     # the fp32 stack the previous fuse_heads kept
    plain, fast = _saved("timm", amp), _saved("fast", amp)
    before = _saved("fast", amp, previous=True)
    assert before - fast >= 0.9 * stack                                # the stack (or its fp32 copy) is gone ...
    assert fast <= 1.15 * plain * N / 65                            # ... and what is left is the plain ViT's, per token
    assert before > 1.15 * plain * N / 65                              # (which the previous code did not meet)
    if amp is not None:                                                # recompute_attn=False: the stack once, in bf16
        keep = _saved("fast", amp, recompute_attn=False)
        assert abs((before - keep) - stack / 2) <= 0.1 * stack
