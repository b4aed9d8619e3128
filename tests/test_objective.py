import itertools
import math

import pytest
import torch

from mdlm_kit import rng
from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.objective import count_weights, masked_nll, nelbo, nelbo_from_keys, subs_log_probs
from mdlm_kit.schedules import make_schedule

SCHEDULES = {
    "loglinear": make_schedule("loglinear", eps=1e-3),
    "linear": make_schedule("linear"),
    "cosine": make_schedule("cosine"),
    "poly2": make_schedule("polynomial", power=2.0),
    "geometric": make_schedule("geometric", sigma_min=1e-3, sigma_max=4.0),  # alpha(1) = 0.018: endpoint matters
}


class ContextFree(torch.nn.Module):
    """Predicts the same distribution at every position, whatever the input (the exact model of i.i.d. data)."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logits = torch.cat([probs.log(), torch.zeros(1)])  # the mask column's value must not matter

    def forward(self, z, cond=None):
        return self.logits.expand(*z.shape, -1)


def _mc(model, x0, schedule, estimator, mask_id, seed=0):
    """Per-sequence NELBO estimates with independent uniform times and masks drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    t = 1.0 - torch.rand(x0.shape[0], dtype=torch.float64, generator=g)  # (0, 1]
    u = torch.rand(x0.shape, dtype=torch.float64, generator=g)
    return nelbo(model, x0, t, u, schedule, mask_id, estimator=estimator).per_seq


def _replicates(model, x0, schedule, estimator, mask_id, reps=16, n=2000):
    """(reps, B) means of n estimates per sequence, with stratified times and masks from (seed, key) as in
    training; independent seeds make the replicate means i.i.d., so their spread gives an honest error bar."""
    keys = torch.arange(n).repeat(x0.shape[0])
    xr = x0.repeat_interleave(n, 0)
    means = []
    for seed in range(reps):
        terms = nelbo_from_keys(model, xr, keys, schedule, mask_id, seed=seed, stream=rng.STREAM_EVAL,
                                estimator=estimator)
        means.append(terms.per_seq.view(x0.shape[0], n).mean(1))
    return torch.stack(means)


@pytest.mark.parametrize("estimator", ["time", "count"])
@pytest.mark.parametrize("name", ["loglinear", "cosine", "geometric"])
def test_iid_source_expectation_is_its_entropy_and_wrong_models_score_worse(name, estimator):
    q = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    entropy = float(-(q * q.log()).sum())
    mask_id, L, n = 5, 32, 8000
    x0 = torch.multinomial(q, n * L, replacement=True).view(n, L)
    schedule = SCHEDULES[name]

    def per_token(model):
        est = _mc(model, x0, schedule, estimator, mask_id) / L
        return est, float(est.mean()), float(est.std() / math.sqrt(n))

    exact_est, mean, se = per_token(ContextFree(q))
    assert se < 0.03 * entropy  # the check below is sharp
    # the sample's own entropy: the exact model's loss on these tokens, no Monte-Carlo over t
    sample_ce = float(-(q.log()[x0]).mean())
    assert abs(mean - sample_ce) < max(4 * se, 1e-5)
    assert abs(sample_ce - entropy) < 0.01
    for wrong in (torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2]), torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])):
        wrong_est, wmean, wse = per_token(ContextFree(wrong))
        cross_entropy = float(-(q * wrong.log()).sum())
        assert cross_entropy > entropy + 0.01
        assert abs(wmean - float(-(wrong.log()[x0]).mean())) < max(4 * wse, 1e-5)
        # paired on the same times and masks: the wrong model is worse beyond doubt
        diff = wrong_est - exact_est
        assert float(diff.mean()) > 5 * float(diff.std() / math.sqrt(n))


def _pattern_losses(model, x0, mask_id):
    """For every non-empty mask pattern S: |S| and g(S) = sum_{l in S} -log p(x_l | x with S masked)."""
    L = x0.shape[-1]
    patterns = torch.tensor(list(itertools.product([False, True], repeat=L)))[1:]  # (P, L)
    gs = []
    for b in range(x0.shape[0]):
        xb = x0[b].expand(len(patterns), L)
        z = torch.where(patterns, torch.full_like(xb, mask_id), xb)
        gs.append(masked_nll(model(z, None), xb, patterns, mask_id).double().sum(-1))
    end = -subs_log_probs(model(torch.full((1, L), mask_id), None), mask_id)[0].gather(-1, x0.T).T.double().sum(-1)
    return patterns.sum(-1), torch.stack(gs), end  # (P,), (B, P), (B,)


def _exact_nelbo(model, x0, schedule, mask_id, num_steps=None):
    """Exact NELBO of a time-agnostic model by enumerating every mask pattern S.

    Continuous: sum_S W(|S|) / C(L, |S|) g(S). Discrete: sum_S sum_i c_i m_i^|S| (1 - m_i)^(L - |S|) g(S),
    c_i = (m_i - m_{i-1}) / m_i. Both plus the endpoint term alpha(1) sum_l -log p(x_l | all masked).
    """
    L = x0.shape[-1]
    k, g, end = _pattern_losses(model, x0, mask_id)
    kf = k.double()
    if num_steps is None:
        binom = torch.tensor([math.comb(L, int(j)) for j in k], dtype=torch.float64)
        coef = count_weights(L, 1.0 - schedule.alpha_at_one)[k] / binom
    else:
        m = schedule.mask_rate(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
        c = (m[1:] - m[:-1]) / m[1:]
        coef = (c[:, None] * m[1:, None] ** kf * (1 - m[1:, None]) ** (L - kf)).sum(0)
    return g @ coef + schedule.alpha_at_one * end


@pytest.fixture(scope="module")
def random_dit():
    torch.manual_seed(1)
    model = DiT(DiTConfig(vocab_size=8, n_layers=2, d_model=32, n_heads=2, max_seq_len=16))
    for p in model.parameters():  # the default init zeroes the output layer: make predictions context-dependent
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("estimator", ["time", "count"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_estimators_are_unbiased_for_the_exact_nelbo_of_a_real_network(random_dit, name, estimator):
    """Every schedule and both estimators give the NELBO computed by exhaustive enumeration."""
    torch.manual_seed(2)
    mask_id, L = 7, 5
    x0 = torch.randint(0, 7, (3, L))
    schedule = SCHEDULES[name]
    with torch.no_grad():
        exact = _exact_nelbo(random_dit, x0, schedule, mask_id)
        reps = _replicates(random_dit, x0, schedule, estimator, mask_id)
    mean, se = reps.mean(0), reps.std(0) / math.sqrt(len(reps))
    # sharp enough to see a 4% (time) or 1% (count) error in a weight; t's heavy tail makes "time" noisier
    assert torch.all(se < (0.01 if estimator == "time" else 0.002) * exact), se / exact
    assert torch.all((mean - exact).abs() < 4 * se), (mean, exact, se)


def test_time_agnostic_nelbo_does_not_depend_on_the_schedule(random_dit):
    """For a time-agnostic model the continuous NELBO is schedule-invariant once the endpoint term is counted."""
    x0 = torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        ends = {name: _exact_nelbo(random_dit, x0, s, 7) for name, s in SCHEDULES.items() if s.alpha_at_one == 0}
        e_geo = _exact_nelbo(random_dit, x0, SCHEDULES["geometric"], 7)
    ref = ends["linear"]
    for value in ends.values():
        torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
    # alpha(1) > 0 changes the generative process (one extra reveal step), so the bound may differ, but only a bit
    assert torch.all((e_geo - ref).abs() < 0.05 * ref)


def test_discrete_time_estimator_is_unbiased_and_approaches_continuous_time(random_dit):
    torch.manual_seed(3)
    mask_id, L = 7, 5
    x0 = torch.randint(0, 7, (3, L))
    schedule = SCHEDULES["cosine"]
    with torch.no_grad():
        exact = _exact_nelbo(random_dit, x0, schedule, mask_id)
        exact_t = {T: _exact_nelbo(random_dit, x0, schedule, mask_id, num_steps=T) for T in (1, 4, 16, 64, 256, 1024)}
        # the one-step-per-sequence estimator of the T-step bound is unbiased for it
        n = 8000
        g = torch.Generator().manual_seed(0)
        xr = x0.repeat_interleave(n, 0)
        t = 1.0 - torch.rand(len(xr), dtype=torch.float64, generator=g)
        u = torch.rand(xr.shape, dtype=torch.float64, generator=g)
        est = nelbo(random_dit, xr, t, u, schedule, mask_id, num_steps=4).per_seq.view(3, n)
    mean, se = est.mean(1), est.std(1) / math.sqrt(n)
    assert torch.all((mean - exact_t[4]).abs() < 4 * se), (mean, exact_t[4], se)
    gaps = [float((exact_t[T] - exact).abs().max()) for T in (1, 4, 16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 100 * gaps[-1] and gaps[-1] < 1e-3 * float(exact.min())
    # first-order convergence: 4x the steps, about 4x closer
    assert 2.5 < gaps[-2] / gaps[-1] < 6


def test_unmasked_positions_contribute_exactly_zero_and_the_mask_is_never_predicted():
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 10, requires_grad=True)
    x0 = torch.randint(0, 9, (2, 6))
    masked = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    nll = masked_nll(logits, x0, masked, mask_id=9)
    assert torch.all(nll[~masked] == 0) and torch.all(nll[masked] > 0)
    nll.sum().backward()
    assert torch.all(logits.grad[~masked] == 0)
    logp = subs_log_probs(logits, mask_id=9)
    assert torch.all(logp[..., 9] == float("-inf"))
    torch.testing.assert_close(logp[..., :9].exp().sum(-1), torch.ones(2, 6))


def test_corruption_of_a_sample_does_not_depend_on_its_batch():
    model = DiT(DiTConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, max_seq_len=32)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x0 = torch.randint(0, 10, (8, 24))
    keys = torch.arange(100, 108)
    sched = make_schedule("loglinear")
    with torch.no_grad():
        for estimator in ("time", "count"):
            batch8 = nelbo_from_keys(model, x0, keys, sched, 10, seed=5, stream=rng.STREAM_VAL, estimator=estimator)
            singles = [
                nelbo_from_keys(model, x0[i : i + 1], keys[i : i + 1], sched, 10, seed=5, stream=rng.STREAM_VAL,
                                estimator=estimator).per_seq
                for i in range(8)
            ]
            torch.testing.assert_close(batch8.per_seq, torch.cat(singles), rtol=1e-5, atol=1e-6)
    # and the noise itself is bit-identical
    t8, u8 = rng.stratified_times(5, 2, keys), rng.token_uniforms(5, 2, keys, 24)
    assert torch.equal(t8[3:4], rng.stratified_times(5, 2, keys[3:4]))
    assert torch.equal(u8[3:4], rng.token_uniforms(5, 2, keys[3:4], 24))
    assert not torch.equal(u8, rng.token_uniforms(6, 2, keys, 24))  # the seed matters


def test_stratified_times_cover_the_interval_evenly():
    t = rng.stratified_times(0, 1, torch.arange(1000, 1032))
    assert t.min() > 0 and t.max() <= 1
    counts = torch.histc(t.float(), bins=8, min=0, max=1)
    assert counts.min() >= 3 and counts.max() <= 5  # i.i.d. uniforms would be far lumpier


def test_splitmix64_matches_the_reference_bits():
    def ref(x):
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    xs = [0, 1, 12345, 2**40 + 7, 2**62 + 3]
    got = rng.splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [ref(x) for x in xs]
    extremes = rng.bits_to_uniform(torch.tensor([-1, 0], dtype=torch.int64))  # all bits set, none set
    assert float(extremes[0]) == 1 - 2.0**-53 and float(extremes[1]) == 2.0**-53
    u = rng.bits_to_uniform(rng.splitmix64(torch.arange(100000)))
    assert u.dtype == torch.float64 and 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005


def _exact_padded(model, x0, n, schedule, mask_id):
    """Exact continuous NELBO of the first n tokens of x0 (the rest is padding, given to the model as is)."""
    L = x0.shape[-1]
    patterns = torch.tensor(list(itertools.product([False, True], repeat=n)))[1:]
    patterns = torch.cat([patterns, torch.zeros(len(patterns), L - n, dtype=torch.bool)], 1)  # (P, L)
    xb = x0.expand(len(patterns), L)
    z = torch.where(patterns, torch.full_like(xb, mask_id), xb)
    g = masked_nll(model(z, None), xb, patterns, mask_id).double().sum(-1)
    k = patterns.sum(-1)
    coef = count_weights(n, 1.0 - schedule.alpha_at_one)[k] / torch.tensor([math.comb(n, int(j)) for j in k],
                                                                            dtype=torch.float64)
    z1 = torch.where(torch.arange(L) < n, mask_id, x0)[None]
    end = -subs_log_probs(model(z1, None), mask_id)[0, :n].gather(-1, x0[:n, None]).double().sum()
    return g @ coef + schedule.alpha_at_one * end


@pytest.mark.parametrize("estimator", ["time", "count"])
@pytest.mark.parametrize("name", ["loglinear", "geometric"])
def test_padded_nelbo_is_the_exact_nelbo_of_the_real_tokens(random_dit, name, estimator):
    """Padding (LM1B's packing) is never masked or scored: both estimators give the bound of the real tokens."""
    torch.manual_seed(4)
    mask_id, L, lengths = 7, 6, (4, 2)
    x0 = torch.randint(0, 7, (2, L))
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    schedule = SCHEDULES[name]
    reps, n = 16, 2000
    keys = torch.arange(n).repeat(2)
    xr, vr = x0.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)
    with torch.no_grad():
        exact = torch.stack([_exact_padded(random_dit, x0[b], lengths[b], schedule, mask_id) for b in range(2)])
        means = []
        for seed in range(reps):
            terms = nelbo_from_keys(random_dit, xr, keys, schedule, mask_id, seed=seed, stream=rng.STREAM_EVAL,
                                    estimator=estimator, valid=vr)
            means.append(terms.per_seq.view(2, n).mean(1))
        means = torch.stack(means)
    assert terms.num_tokens.view(2, n)[:, 0].tolist() == list(map(float, lengths))
    mean, se = means.mean(0), means.std(0) / math.sqrt(reps)
    assert torch.all(se < 0.02 * exact), se / exact
    assert torch.all((mean - exact).abs() < 4 * se), (mean, exact, se)
    # scoring the padding too would give the bound of all L tokens, far above: the check can tell them apart
    with torch.no_grad():
        all_tokens = _exact_nelbo(random_dit, x0, schedule, mask_id)
    assert torch.all(all_tokens - exact > 10 * se)


def test_nelbo_follows_a_time_conditioned_model_and_names_the_flag():
    """The README's API call on a time-conditioned DiT: nelbo() reads config.time_conditioning itself (the mask rate
    reaches the model), and an explicit time_conditioning=False is refused naming that flag, not DiT's cond."""
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("debug", vocab_size=11, time_conditioning=True))
    for p in model.parameters():  # adaLN starts at zero: make the time embedding matter
        torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randint(0, 10, (4, 16))
    t, u = torch.tensor([0.2, 0.4, 0.6, 0.9], dtype=torch.float64), torch.rand(4, 16, dtype=torch.float64)
    sched = make_schedule("loglinear")
    auto = nelbo(model, x0, t, u, sched, mask_id=10).per_seq
    explicit = nelbo(model, x0, t, u, sched, mask_id=10, time_conditioning=True).per_seq
    assert torch.equal(auto, explicit)
    # the conditioning matters: the same masks scored with another time's embedding differ
    shifted = nelbo(lambda z, c: model(z, c.flip(0)), x0, t, u, sched, mask_id=10, time_conditioning=True).per_seq
    assert not torch.allclose(auto, shifted)
    with pytest.raises(ValueError, match=r"nelbo\(\.\.\., time_conditioning=True\)"):
        nelbo(model, x0, t, u, sched, mask_id=10, time_conditioning=False)
