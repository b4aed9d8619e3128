"""The fused linear + weighted cross-entropy and the masked-only head: same loss and gradients."""

import pytest
import torch

from helpers import random_dit
from mdlm_kit.kernels.weighted_ce import (
    weighted_ce_rows_reference,
    weighted_ce_rows_triton,
    weighted_linear_cross_entropy,
)
from mdlm_kit.objective import nelbo
from mdlm_kit.schedules import make_schedule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _truth(h, W, b, y, w, ignore):
    """float64 ground truth with full logits: loss, d/dh, d/dW, d/db."""
    h, W, b = (t.detach().double().requires_grad_() for t in (h, W, b))
    logits = h @ W.T + b
    logits = logits.masked_fill(torch.arange(W.shape[0]) == ignore, float("-inf"))
    nll = -torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    loss = (nll * w.double()).sum()
    loss.backward()
    return loss.detach(), nll.detach(), h.grad, W.grad, b.grad


def _problem(n=23, d=16, V=37, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    W = torch.randn(V, d, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.5
    ignore = V - 1 if ignore is None else ignore
    y = torch.randint(0, V, (n,), generator=g)
    y[y == ignore] = 0
    w = torch.rand(n, generator=g, dtype=torch.float64) * 3
    return h, W, b, y, w, ignore


def _mismatch(a, b, atol, rtol):
    bad = ~torch.isclose(a, b, atol=atol, rtol=rtol)
    return f"{int(bad.sum())} of {bad.numel()} mismatch, first at {bad.nonzero()[:5].tolist()}"


@pytest.mark.parametrize("kernel", ["never", "always"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_fused_loss_and_gradients_match_float64_full_logits(kernel, chunk_rows):
    h, W, b, y, w, ignore = _problem(V=37 if kernel == "always" else 301)
    loss_t, nll_t, gh_t, gw_t, gb_t = _truth(h, W, b, y, w, ignore)
    hh, WW, bb = (t.clone().to(DEVICE).requires_grad_() for t in (h, W, b))
    loss, nll = weighted_linear_cross_entropy(hh, WW, bb, y.to(DEVICE), w.to(DEVICE), ignore,
                                              chunk_rows=chunk_rows, kernel=kernel)
    (loss * 0.7).backward()  # the incoming gradient scales the stored ones
    assert loss.item() == pytest.approx(loss_t.item(), rel=1e-5)
    torch.testing.assert_close(nll.cpu().double(), nll_t, atol=1e-5, rtol=1e-5)
    for got, want, name in ((hh.grad, gh_t, "h"), (WW.grad, gw_t, "W"), (bb.grad, gb_t, "b")):
        got, want = got.cpu().double(), 0.7 * want
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, _mismatch(got, want, 1e-5, 1e-4))
    assert WW.grad[ignore].abs().max() < 1e-7 and bb.grad[ignore].abs().max() < 1e-7  # SUBS: no mass on the mask


@pytest.mark.parametrize("V, ignore", [(5, 0), (37, 36), (1003, 500), (5000, 4999)])
def test_triton_row_step_matches_the_reference(V, ignore):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(4, V, generator=g) * 3
    y = torch.randint(0, V, (4,), generator=g)
    y[y == ignore] = (ignore + 1) % V
    w = torch.rand(4, generator=g)
    ref_logits, ker_logits = logits.clone(), logits.clone().to(DEVICE)
    ref = weighted_ce_rows_reference(ref_logits, y, w, ignore, write_grad=True)
    ker = weighted_ce_rows_triton(ker_logits, y.to(DEVICE), w.to(DEVICE), ignore, write_grad=True)
    torch.testing.assert_close(ker.cpu(), ref, atol=1e-5, rtol=1e-5)
    got = ker_logits.cpu()
    assert torch.allclose(got, ref_logits, atol=1e-6, rtol=1e-5), _mismatch(got, ref_logits, 1e-6, 1e-5)
    assert (got[:, ignore] == 0).all()
    # without the gradient: the same losses
    nll = weighted_ce_rows_triton(logits.clone().to(DEVICE), y.to(DEVICE), w.to(DEVICE), ignore, write_grad=False)
    torch.testing.assert_close(nll.cpu(), ref, atol=1e-5, rtol=1e-5)
    nll_ref = weighted_ce_rows_reference(logits.clone(), y, w, ignore, write_grad=False)
    torch.testing.assert_close(nll_ref, ref, atol=0, rtol=0)


def test_bf16_error_is_no_worse_than_the_full_logits_reference():
    """Against float64 truth, the fused path in bf16 errs no more than full bf16 logits do (plus a little)."""
    h, W, b, y, w, ignore = _problem(n=64, d=32, V=501, seed=3)
    loss_t, *_ = _truth(h, W, b, y, w, ignore)
    hb, Wb, bb = h.bfloat16(), W.bfloat16(), b.bfloat16()
    logits = (hb @ Wb.T + bb).float()
    logits[:, ignore] = float("-inf")
    ref = -(torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1).double() * w).sum()
    fused, _ = weighted_linear_cross_entropy(hb, Wb, bb, y, w, ignore, chunk_rows=16)
    assert abs(fused.item() - loss_t.item()) <= abs(ref.item() - loss_t.item()) + 1e-3 * abs(loss_t.item())


@pytest.mark.parametrize("estimator, time_conditioning", [("time", False), ("count", False), ("time", True)])
def test_masked_only_head_gives_the_same_nelbo_and_gradients(estimator, time_conditioning):
    model = random_dit(vocab_size=37, n_layers=2, d_model=32, max_seq_len=16, std=0.3)
    if time_conditioning:
        from mdlm_kit.models import DiT, DiTConfig

        torch.manual_seed(1)
        model = DiT(DiTConfig(vocab_size=37, n_layers=2, d_model=32, n_heads=2, max_seq_len=16,
                              time_conditioning=True))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.15)  # larger random adaLN weights amplify float32 rounding
    x0 = torch.randint(0, 36, (6, 16))
    t = torch.rand(6, dtype=torch.float64)
    u = torch.rand(6, 16, dtype=torch.float64)
    sched = make_schedule("loglinear")
    runs = []
    for masked_only in (False, True):
        model.zero_grad()
        terms = nelbo(model.features if masked_only else model, x0, t, u, sched, 36, estimator=estimator,
                      time_conditioning=time_conditioning, head=model.head if masked_only else None)
        terms.per_token().backward()
        runs.append((terms, [p.grad.clone() for p in model.parameters()]))
    (full, g_full), (fast, g_fast) = runs
    assert fast.total is not None and full.total is None
    # float32 logits on both paths: equal up to float32 rounding
    assert fast.per_token().item() == pytest.approx(full.per_token().item(), rel=1e-6)
    torch.testing.assert_close(fast.per_seq, full.per_seq.detach(), atol=1e-5, rtol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), g_full, g_fast):
        atol = 1e-5 * float(a.abs().max())
        assert torch.allclose(a, b, atol=atol, rtol=1e-3), (name, _mismatch(a, b, atol, 1e-3))


def test_masked_only_head_under_bf16_autocast_matches_full_logits():
    """Lightning's bf16-mixed runs the step under autocast: the fused path must run and agree to bf16 accuracy."""
    model = random_dit(vocab_size=37, n_layers=2, d_model=32, max_seq_len=16, std=0.3)
    x0 = torch.randint(0, 36, (5, 16))
    t, u = torch.rand(5, dtype=torch.float64), torch.rand(5, 16, dtype=torch.float64)
    values = []
    for masked_only in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = nelbo(model.features if masked_only else model, x0, t, u, make_schedule("loglinear"), 36,
                          head=model.head if masked_only else None)
        terms.per_token().backward()
        values.append(terms.per_token().item())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert values[1] == pytest.approx(values[0], rel=1e-2)
