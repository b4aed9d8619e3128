"""Fused linear + weighted cross-entropy over selected rows (the NELBO's masked positions), without (N, V) logits:

    loss = sum_i w_i * ( logsumexp_{v != ignore} (h_i . W_v + b_v) - (h_i . W_{y_i} + b_{y_i}) )

As Liger-Kernel's fused linear cross-entropy: chunk by chunk over the rows, the float32 logits become per-row losses
and, in the same pass, the gradient w_i (softmax_i - onehot(y_i)), multiplied straight into the gradients of h, W
and b; backward only scales them. The ``ignore`` column (the mask token, SUBS) gets probability 0 and gradient 0.
Layering: ``_weighted_ce_rows_kernel`` -> ``weighted_ce_rows_triton`` (or the pure-torch ``weighted_ce_rows_reference``)
-> ``_FusedLinearWeightedCE`` (chunk loop) -> ``weighted_linear_cross_entropy``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm_kit.kernels import Kernel, use_kernel


def weighted_ce_rows_reference(logits: Tensor, targets: Tensor, row_weights: Tensor, ignore_index: int,
                               write_grad: bool) -> Tensor:
    """Per-row NLL (float32) of float32 ``logits`` (n, V), overwritten (if ``write_grad``) with d(sum_i w_i nll_i)/d
    logits = w_i (softmax_i - onehot(y_i)), 0 in the ignored column. In place, in few passes: on CPU these passes, not
    the matmuls, are the fused path's cost."""
    rows = torch.arange(len(targets), device=logits.device)
    logits[:, ignore_index] = float("-inf")
    x_y = logits[rows, targets]  # (n,)
    m = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    e = logits.sub_(m).exp_()  # unnormalized probabilities; exp(-inf) = 0 in the ignored column
    s = e.sum(-1)  # (n,)
    nll = m.squeeze(-1) + torch.log(s) - x_y
    if not write_grad:
        return nll
    w = row_weights.to(e.dtype)
    e.mul_((w / s)[:, None])  # w_i softmax_i
    e[rows, targets] -= w
    return nll


try:  # Triton is optional: the reference serves CPUs and machines without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

if triton is not None:

    @triton.jit
    def _weighted_ce_rows_kernel(
        logits_ptr,  # *fp32 (n, V), row stride `stride_row`, unit column stride; gradient written in place
        targets_ptr,  # *int64 (n,)
        weights_ptr,  # *fp32 (n,) row weights w_i
        nll_ptr,  # *fp32 (n,) out: -log p(y_i)
        V,  # vocabulary size
        stride_row,  # elements between rows
        ignore_index,  # column with probability 0 (the mask token)
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # int64 offsets: n * V can exceed 2^31
        base = logits_ptr + pid * stride_row
        y = tl.load(targets_ptr + pid)
        # pass 1: online max and sum of exponentials over the vocabulary
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = (cols < V) & (cols != ignore_index)
            x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(nll_ptr + pid, lse - tl.load(base + y).to(tl.float32))
        if WRITE_GRAD:
            # pass 2: gradient w (softmax - onehot), 0 at the ignored column
            w = tl.load(weights_ptr + pid).to(tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                inside = cols < V
                x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
                p = tl.where(cols == ignore_index, 0.0, tl.exp(x - lse))
                p = tl.where(cols == y, p - 1.0, p)
                tl.store(base + cols, p * w, mask=inside)


def weighted_ce_rows_triton(logits: Tensor, targets: Tensor, row_weights: Tensor, ignore_index: int,
                            write_grad: bool) -> Tensor:
    """Launcher of ``_weighted_ce_rows_kernel``; same contract as ``weighted_ce_rows_reference``."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    n, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return nll
    block = min(4096, triton.next_power_of_2(V))
    _weighted_ce_rows_kernel[(n,)](
        logits, targets.contiguous(), row_weights.float().contiguous(), nll, V, logits.stride(0), ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block,
    )
    return nll


class _FusedLinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, row_weights, ignore_index, chunk_rows, kernel_rows, needs_grad):
        n_rows = h.shape[0]
        step = weighted_ce_rows_triton if kernel_rows else weighted_ce_rows_reference
        nll = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if needs_grad else None
        w_mat = weight.to(h.dtype)
        # one float32 buffer for every chunk: fresh 64 MB allocations cost page faults on every chunk
        buf = torch.empty(min(chunk_rows, n_rows), weight.shape[0], dtype=torch.float32, device=h.device)
        for lo in range(0, n_rows, chunk_rows):
            rows = slice(lo, lo + chunk_rows)
            hc = h[rows]  # (n, D)
            logits = buf[: len(hc)]  # (n, V)
            if h.dtype == torch.float32:
                if bias is not None:  # the bias added inside the matmul, no second pass
                    torch.addmm(bias.float(), hc, w_mat.T, out=logits)
                else:
                    torch.mm(hc, w_mat.T, out=logits)
            else:  # low-precision matmul, float32 logits
                logits.copy_(hc @ w_mat.T if bias is None else torch.addmm(bias.to(hc.dtype), hc, w_mat.T))
            nll[rows] = step(logits, targets[rows], row_weights[rows], ignore_index, needs_grad)
            if needs_grad:  # logits now hold d loss / d logits for this chunk
                grad_h[rows] = logits.to(h.dtype) @ w_mat
                grad_w.addmm_(logits.T, hc.float())
                grad_b += logits.sum(0)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                                  grad_b.to(bias.dtype) if bias is not None else grad_b)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(nll)
        loss = (nll.double() * row_weights.double()).sum()
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        g = grad_loss.to(grad_h.dtype)
        return (grad_h * g, grad_w * g.to(grad_w.dtype), (grad_b * g.to(grad_b.dtype)) if ctx.has_bias else None,
                None, None, None, None, None, None)


def weighted_linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                  row_weights: Tensor, ignore_index: int, chunk_rows: int | None = None,
                                  kernel: Kernel = "auto") -> tuple[Tensor, Tensor]:
    """sum_i w_i CE(h_i W^T + b, y_i) without the ``ignore_index`` column, chunk by chunk (default ~64 MB of logits).

    ``h`` (N, D) float32 or bf16/fp16, ``weight`` (V, D), ``bias`` (V,) or None, ``targets`` (N,), ``row_weights``
    (N,) (not differentiated) -> the weighted sum (float64 scalar, differentiable) and the per-row NLL (N,) float32.
    """
    V = weight.shape[0]
    chunk_rows = chunk_rows or max(1, (1 << 24) // V)
    # ctx.needs_input_grad ignores torch.no_grad(): decide here, so evaluation computes no gradients
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    return _FusedLinearWeightedCE.apply(h, weight, bias, targets, row_weights, ignore_index, chunk_rows,
                                        use_kernel(kernel, h), needs_grad)
