"""The fused masked categorical kernel against its torch reference.

Runs under TRITON_INTERPRET=1 on CPU (set in conftest.py) on small shapes, and on a GPU when one exists.
"""

import pytest
import torch

from mdlm_kit import rng
from mdlm_kit.kernels.masked_categorical import masked_categorical_reference, masked_categorical_triton
from mdlm_kit.sampling import SamplerOptions, SamplingContext, get_sampler
from mdlm_kit.sampling import categorical as categorical_mod
from mdlm_kit.schedules import make_schedule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mismatch(a, b):
    bad = (a != b).nonzero().flatten().tolist()
    return f"{len(bad)} mismatching rows, first {bad[:10]}"


@pytest.mark.parametrize("vocab, block_v", [(5, 1024), (37, 16), (1003, 256)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_draws_the_reference_tokens_for_the_same_keys(vocab, block_v, temperature):
    torch.manual_seed(vocab)
    logits = (3 * torch.randn(64, vocab)).to(DEVICE)
    mask_id = vocab - 1
    logits[:, mask_id] = 100.0  # the mask would win every draw if it were not excluded
    rows = torch.tensor([0, 5, 6, 7, 20, 33, 63, 2], device=DEVICE)
    row_hash = rng.row_hash(3, rng.STREAM_SAMPLE, torch.arange(len(rows), device=DEVICE) + 100)
    tk, lk = masked_categorical_triton(logits, rows, row_hash, mask_id, temperature, block_v=block_v)
    tr, lr = masked_categorical_reference(logits, rows, row_hash, mask_id, temperature)
    assert torch.equal(tk, tr), _mismatch(tk, tr)
    assert not (tk == mask_id).any()
    torch.testing.assert_close(lk, lr, rtol=1e-10, atol=1e-10)


def test_kernel_reads_only_the_selected_rows():
    logits = torch.randn(10, 33, device=DEVICE)
    poisoned = logits.clone()
    poisoned[[1, 2, 4, 8, 9]] = float("nan")  # rows not sampled: reading them would poison nothing but NaN
    rows = torch.tensor([0, 3, 5, 6, 7], device=DEVICE)
    h = rng.row_hash(0, rng.STREAM_SAMPLE, rows)
    t_clean, l_clean = masked_categorical_triton(logits, rows, h, 32)
    t_pois, l_pois = masked_categorical_triton(poisoned, rows, h, 32)
    assert torch.equal(t_clean, t_pois) and torch.equal(l_clean, l_pois)
    assert torch.isfinite(l_pois).all()


def test_kernel_matches_the_library_sampler_and_its_distribution():
    """The kernel draws the library sampler's tokens (on the first 300 rows under the CPU interpreter: a row's draw
    depends on its key alone), and those follow the distribution."""
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = torch.cat([probs.log(), torch.tensor([5.0])]).expand(1500, -1).contiguous().to(DEVICE)
    keys = torch.arange(1500, device=DEVICE)
    k = 1500 if DEVICE == "cuda" else 300
    tk, _ = categorical_mod.sample_categorical(logits[:k], keys[:k], seed=9, mask_id=5, kernel="always")
    tr, _ = categorical_mod.sample_categorical(logits, keys, seed=9, mask_id=5, kernel="never")
    assert torch.equal(tk, tr[:k]), _mismatch(tk, tr[:k])
    freq = torch.bincount(tr.cpu(), minlength=6).double() / 1500
    assert freq[5] == 0
    assert torch.all((freq[:5] - probs.double()).abs() < 4 * torch.sqrt(probs.double() * (1 - probs.double()) / 1500))


def test_fhs_through_the_kernel_draws_from_the_exact_distribution(tiny):
    """fhs through the kernel draws the reference's tokens, which follow the exact distribution. Samples do not
    depend on the batch, so under the CPU interpreter (milliseconds per row) the kernel draws the first 300 only."""
    from test_sampling import MASK, L, chi_square_p, exact_distribution

    model, probs = tiny, exact_distribution(tiny)
    n = 1200
    out = {}
    for kernel, count in (("never", n), ("always", n if DEVICE == "cuda" else 300)):
        ctx = SamplingContext(model.to(DEVICE), make_schedule("linear"), MASK)
        out[kernel] = get_sampler("fhs")(ctx, torch.full((count, L), MASK, device=DEVICE),
                                         torch.arange(count, device=DEVICE), SamplerOptions(seed=5, kernel=kernel))
    assert torch.equal(out["always"], out["never"][: len(out["always"])])
    assert chi_square_p(out["never"].cpu(), probs) > 1e-3
