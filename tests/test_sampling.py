import itertools
import math

import pytest
import torch

from helpers import random_dit
from mdlm_kit.errors import UserError
from mdlm_kit.sampling import SamplerOptions, SamplingContext, get_sampler
from mdlm_kit.sampling.categorical import sample_categorical
from mdlm_kit.schedules import make_schedule

V, L, MASK = 4, 4, 4  # four real tokens, the mask is id 4


def exact_distribution(model) -> torch.Tensor:
    """P(x) of the continuous-time reverse process of a time-agnostic model, alpha(1) = 0:
    any-order autoregression, P(x) = mean over orders of prod_i p(x_order_i | x revealed so far)."""
    xs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (V^L, L)
    subsets = torch.tensor(list(itertools.product([False, True], repeat=L)))  # revealed sets, (2^L, L)
    z = torch.where(subsets[None], xs[:, None], torch.full_like(xs[:, None], MASK))  # (V^L, 2^L, L)
    with torch.no_grad():
        logits = model(z.view(-1, L)).double()
    logits[..., MASK] = float("-inf")
    logp = torch.log_softmax(logits, -1).view(len(xs), len(subsets), L, V + 1)
    logp_x = logp.gather(-1, xs[:, None, :, None].expand(-1, len(subsets), -1, 1)).squeeze(-1)  # (V^L, 2^L, L)
    index = {tuple(s.tolist()): i for i, s in enumerate(subsets)}
    probs = torch.zeros(len(xs), dtype=torch.float64)
    for order in itertools.permutations(range(L)):
        revealed = [False] * L
        total = torch.zeros(len(xs), dtype=torch.float64)
        for pos in order:
            total += logp_x[:, index[tuple(revealed)], pos]
            revealed[pos] = True
        probs += total.exp()
    return probs / math.factorial(L)


def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    codes = (samples * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    observed = torch.bincount(codes, minlength=len(probs)).double()
    expected = probs * len(samples)
    big = expected >= 5  # pool the rare sequences into one bin
    obs = torch.cat([observed[big], observed[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.parametrize("name, steps", [("fhs", None), ("ancestral_cache", 1000)])
def test_samplers_draw_from_the_exact_reverse_process(tiny, name, steps):
    probs = exact_distribution(tiny)
    assert abs(float(probs.sum()) - 1) < 1e-9
    ctx = SamplingContext(tiny, make_schedule("linear"), MASK)
    n = 20000
    template = torch.full((n, L), MASK)
    out = get_sampler(name)(ctx, template, torch.arange(n), SamplerOptions(steps=steps, seed=1))
    assert not (out == MASK).any()
    assert chi_square_p(out, probs) > 1e-3
    # and the test has power: a wrong distribution (one order fixed: left to right) is rejected
    wrong = exact_distribution_left_to_right(tiny)
    assert chi_square_p(out, wrong) < 1e-6


def exact_distribution_left_to_right(model) -> torch.Tensor:
    xs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    total = torch.zeros(len(xs), dtype=torch.float64)
    with torch.no_grad():
        for pos in range(L):
            z = xs.clone()
            z[:, pos:] = MASK
            logits = model(z).double()
            logits[..., MASK] = float("-inf")
            total += torch.log_softmax(logits, -1)[torch.arange(len(xs)), pos, xs[:, pos]]
    return total.exp()


def test_network_calls_fhs_once_per_token_ancestral_once_per_step(tiny):
    template = torch.full((3, L), MASK)
    calls = {}
    for name, steps in (("fhs", None), ("ancestral", 200), ("ancestral_cache", 200)):
        ctx = SamplingContext(tiny, make_schedule("linear"), MASK)
        get_sampler(name)(ctx, template[:1], torch.arange(1), SamplerOptions(steps=steps))
        calls[name] = ctx.calls
    assert calls["fhs"] == L
    assert 1 <= calls["ancestral_cache"] <= L  # a call only when a token is revealed
    assert calls["ancestral"] > 10 * L  # every step until the last token is revealed


def test_ancestral_cache_draws_exactly_what_ancestral_draws(small_model):
    """Skipping the network when nothing changed is exact for a time-agnostic model: same noise, same samples."""
    template = torch.full((6, 10), 11)
    outs = []
    for name in ("ancestral", "ancestral_cache"):
        ctx = SamplingContext(small_model, make_schedule("loglinear"), 11)
        outs.append(get_sampler(name)(ctx, template, torch.arange(6), SamplerOptions(steps=300, seed=5)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["fhs", "ancestral", "ancestral_cache"])
@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_infilling_keeps_given_tokens_and_samples_do_not_depend_on_the_batch(small_model, name, schedule):
    ctx = SamplingContext(small_model, make_schedule(schedule), 11)
    template = torch.full((5, 10), 11)
    template[:, 0:2] = torch.tensor([3, 4])  # a prompt
    template[:, 6] = 7  # and a token to infill around
    opts = SamplerOptions(steps=64, seed=3)
    out = get_sampler(name)(ctx, template, torch.arange(10, 15), opts)
    assert torch.all(out[:, :2] == torch.tensor([3, 4])) and torch.all(out[:, 6] == 7)
    assert not (out == 11).any()
    alone = get_sampler(name)(ctx, template[2:3], torch.arange(12, 13), opts)
    assert torch.equal(alone[0], out[2])
    other_seed = get_sampler(name)(ctx, template, torch.arange(10, 15), SamplerOptions(steps=64, seed=4))
    assert not torch.equal(other_seed, out)


def test_categorical_never_samples_the_mask_and_respects_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 50.0]]).repeat(2000, 1)  # the mask (id 3) has the largest logit
    tok, logp = sample_categorical(logits, torch.arange(2000), seed=0, mask_id=3)
    assert not (tok == 3).any()
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    freq = torch.bincount(tok, minlength=3).double() / 2000
    assert torch.all((freq - p).abs() < 4 * torch.sqrt(p * (1 - p) / 2000))
    torch.testing.assert_close(logp, p.log()[tok])
    tok, _ = sample_categorical(logits, torch.arange(2000), seed=0, mask_id=3, top_p=0.6)
    assert set(tok.tolist()) == {2}  # 0.665 alone covers 0.6
    cold, _ = sample_categorical(logits, torch.arange(2000), seed=0, mask_id=3, temperature=0.05)
    assert set(cold.tolist()) == {2}


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(steps=0), "steps"), (dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"),
     (dict(top_p=0.0), "top_p"), (dict(precision="float16"), "precision")],
)
def test_bad_sampler_options(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplerOptions(**kwargs)
    with pytest.raises(UserError, match="unknown sampler 'ddim'"):
        get_sampler("ddim")


def test_float64_gumbel_reaches_the_tail_that_float32_cuts_off():
    from mdlm_kit.sampling.categorical import gumbel

    u = torch.tensor([1.0 - 2.0**-53, 1.0 - 2.0**-30], dtype=torch.float64)
    g64, g32 = gumbel(u, "float64"), gumbel(u, "float32")
    assert float(g64[0]) > 36.0 and float(g64[1]) > 20.0
    assert float(g32.max()) < 16.7  # float32 cannot represent u closer to 1 than 2^-24


def test_long_tail_frequency_matches_its_mass():
    """One token at 0.5, the other half spread over 50,000 tokens: the default sampler's tail
    frequency matches 0.5; the float32 option's deviation is measured and printed."""
    tail = 50_000
    logits = torch.cat([torch.tensor([math.log(0.5)]), torch.full((tail,), math.log(0.5 / tail)), torch.tensor([0.0])])
    n = 2000
    rows = logits.expand(n, -1)
    freq = {}
    for precision in ("float64", "float32"):
        tok, _ = sample_categorical(rows, torch.arange(n), seed=0, mask_id=tail + 1, precision=precision)
        assert not (tok == tail + 1).any()
        freq[precision] = float((tok > 0).double().mean())
    se = math.sqrt(0.25 / n)
    assert abs(freq["float64"] - 0.5) < 4 * se
    print(f"\ntail mass 0.5: float64 frequency {freq['float64']:.4f}, float32 {freq['float32']:.4f} (se {se:.4f})")


@pytest.fixture(scope="module")
def small_model():
    return random_dit(vocab_size=12, n_layers=1, d_model=16, max_seq_len=16)


def test_semi_ar_generates_beyond_the_models_length_in_blocks(small_model):
    ctx = SamplingContext(small_model, make_schedule("loglinear"), 11, max_len=16)
    template = torch.full((3, 40), 11)  # 2.5x the model's maximum length
    template[:, :3] = torch.tensor([1, 2, 3])
    template[:, 30] = 5
    opts = SamplerOptions(block_length=8, seed=2)
    out = get_sampler("semi_ar")(ctx, template, torch.arange(3), opts)
    assert not (out == 11).any()
    assert torch.all(out[:, :3] == torch.tensor([1, 2, 3])) and torch.all(out[:, 30] == 5)
    alone = get_sampler("semi_ar")(ctx, template[1:2], torch.arange(1, 2), opts)
    assert torch.equal(alone[0], out[1])
    with pytest.raises(UserError, match="block_length 20"):
        get_sampler("semi_ar")(ctx, template, torch.arange(3), SamplerOptions(block_length=20))


def test_semi_ar_within_one_window_is_its_inner_sampler(tiny):
    """With one block covering the sequence, semi_ar is fhs: the same exact distribution."""
    probs = exact_distribution(tiny)
    ctx = SamplingContext(tiny, make_schedule("linear"), MASK, max_len=8)
    n = 20000
    out = get_sampler("semi_ar")(ctx, torch.full((n, L), MASK), torch.arange(n), SamplerOptions(block_length=L))
    assert chi_square_p(out, probs) > 1e-3


def test_confidence_commits_the_most_confident_tokens_within_blocks(small_model):
    ctx = SamplingContext(small_model, make_schedule("loglinear"), 11)
    template = torch.full((4, 12), 11)
    template[:, 0] = 2
    opts = SamplerOptions(steps=6, block_length=4, seed=1)
    out = get_sampler("confidence")(ctx, template, torch.arange(4), opts)
    assert not (out == 11).any() and torch.all(out[:, 0] == 2)
    assert ctx.calls <= 6
    # one step per token, temperature -> 0: each step commits the single most confident position,
    # and the result is the greedy (argmax) decoding order
    ctx = SamplingContext(small_model, make_schedule("loglinear"), 11)
    opts = SamplerOptions(steps=4, temperature=1e-4)
    greedy = get_sampler("confidence")(ctx, template[:1, :5], torch.arange(1), opts)
    z = template[:1, :5].clone()
    with torch.no_grad():
        for _ in range(4):
            logits = small_model(z).double()
            logits[..., 11] = float("-inf")
            logp, tok = torch.log_softmax(logits, -1).max(-1)
            logp[z != 11] = float("-inf")
            pos = int(logp.argmax())
            z[0, pos] = tok[0, pos]
    assert torch.equal(greedy, z)


def test_fhs_with_several_tokens_per_step_needs_fewer_calls(small_model):
    ctx = SamplingContext(small_model, make_schedule("linear"), 11)
    template = torch.full((2, 12), 11)
    out = get_sampler("fhs")(ctx, template, torch.arange(2), SamplerOptions(tokens_per_step=3))
    assert not (out == 11).any() and ctx.calls == 4  # 12 tokens, 3 per call
