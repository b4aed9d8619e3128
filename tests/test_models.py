import pytest
import torch

from mdlm_kit.models import SIZES, DiT, DiTConfig


def _perturbed(model):
    for p in model.parameters():  # leave the zero init, so outputs depend on everything
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_forward_shapes_and_zero_init_predicts_uniformly():
    model = DiT(DiTConfig.from_name("debug", vocab_size=50))
    x = torch.randint(0, 50, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 50)
    assert torch.all(logits == 0)  # zero output layer: uniform predictions at the start of training


def test_attention_is_bidirectional_and_the_causal_variant_is_not():
    torch.manual_seed(0)
    cfg = DiTConfig(vocab_size=20, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)
    x = torch.randint(0, 20, (1, 12))
    y = x.clone()
    y[0, 9] = (x[0, 9] + 1) % 20
    bi = _perturbed(DiT(cfg))
    assert not torch.allclose(bi(x)[0, :9], bi(y)[0, :9])  # earlier positions see the later change
    ar = _perturbed(DiT(cfg, causal=True))
    torch.testing.assert_close(ar(x)[0, :9], ar(y)[0, :9])  # a causal model does not
    assert not torch.allclose(ar(x)[0, 9:], ar(y)[0, 9:])


@pytest.mark.parametrize("kernel", [3, 4])
def test_local_convolution_sees_its_window_and_the_causal_one_looks_back_only(kernel):
    """conv_kernel: a one-layer model without attention's reach (every block but the convolution zeroed) changes
    exactly at the positions whose window holds the changed token: i-1..i+1 for width 3 (i-1..i+2 for 4, the extra
    position on the right); the causal convolution only at i..i+k-1, so the autoregressive factorization stays exact."""
    torch.manual_seed(0)
    cfg = DiTConfig(vocab_size=20, n_layers=1, d_model=32, n_heads=4, max_seq_len=16, conv_kernel=kernel)
    x = torch.randint(0, 20, (1, 12))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 20
    for causal, window in ((False, range(6 - kernel // 2, 7 + (kernel - 1) // 2)), (True, range(6, 6 + kernel))):
        model = _perturbed(DiT(cfg, causal=causal))
        torch.nn.init.zeros_(model.blocks[0].attn.out.weight)  # no attention, no MLP: only the convolution mixes
        torch.nn.init.zeros_(model.blocks[0].mlp.proj.weight)
        changed = (model(x) - model(y)).abs().amax(-1)[0] > 1e-6
        assert changed.nonzero().flatten().tolist() == list(window), (causal, changed)
    # the full model: a causal one with the convolution is still blind to later tokens
    ar = _perturbed(DiT(cfg, causal=True))
    torch.testing.assert_close(ar(x)[0, :6], ar(y)[0, :6])
    assert not torch.allclose(ar(x)[0, 6:], ar(y)[0, 6:])


def test_rotary_makes_the_model_position_aware():
    torch.manual_seed(0)
    model = DiT(DiTConfig(vocab_size=20, n_layers=1, d_model=32, n_heads=2, max_seq_len=16)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    # positions 2 and 6 hold the same token among the same multiset of tokens: without positional
    # information attention is permutation-equivariant and their outputs are equal
    x = torch.tensor([[7, 3, 3, 3, 3, 3, 3, 3]])
    out = model(x)[0]
    assert (out[2] - out[6]).abs().max() > 1e-3
    model.rotary.forward = lambda t: t  # rotary off
    out = model(x)[0]
    torch.testing.assert_close(out[2], out[6], rtol=0, atol=1e-5)


def test_time_conditioning_uses_the_noise_level_and_agnostic_models_ignore_it():
    torch.manual_seed(0)
    cfg = DiTConfig(vocab_size=20, n_layers=2, d_model=32, n_heads=2, cond_dim=16, time_conditioning=True)
    model = _perturbed(DiT(cfg))
    x = torch.randint(0, 20, (2, 10))
    a, b = model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="time-conditioned"):
        model(x)
    agnostic = DiT(DiTConfig.from_name("debug", 20))
    assert not any("adaLN" in n or "time_embed" in n for n, _ in agnostic.named_parameters())
    fresh = DiT(cfg)  # DiT init: gates closed, so a fresh time-conditioned model ignores t
    torch.testing.assert_close(fresh(x, torch.tensor([0.1, 0.1])), fresh(x, torch.tensor([0.9, 0.9])))


def test_named_sizes():
    assert set(SIZES) == {"debug", "tiny", "small", "medium"}
    small = DiTConfig.from_name("small", vocab_size=50258)
    assert (small.n_layers, small.d_model, small.n_heads) == (12, 768, 12)
    tiny = DiT(DiTConfig.from_name("tiny", vocab_size=2049))
    assert 1.0e6 < tiny.num_parameters() < 1.6e6
    with torch.device("meta"):
        n_small = DiT(small).num_parameters()
    # MDLM small: 12 x 12 d^2 in the blocks plus untied input/output embeddings of the GPT-2 vocabulary
    assert 12 * 12 * 768**2 < n_small - 2 * 50258 * 768 < 1.05 * 12 * 12 * 768**2 + 2e6
    assert DiTConfig.from_name("debug", 20, n_layers=5).n_layers == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=30, n_heads=4), "heads of even size"),
        (dict(vocab_size=1), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_layers=0), "n_layers"),
        (dict(conv_kernel=-1), "conv_kernel must be >= 0"),
        (dict(conv_kernel=3, layout="mdlm"), "conv_kernel must be 0 with layout mdlm"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(vocab_size=10, n_layers=1, d_model=32, n_heads=2)
    # models/ imports only torch: its errors are ValueErrors (mdlm_kit.errors.UserError is one too)
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**base, **kwargs})
    with pytest.raises(ValueError, match="unknown model size"):
        DiTConfig.from_name("huge", 10)


def test_sequences_longer_than_max_seq_len_are_refused():
    model = DiT(DiTConfig(vocab_size=10, n_layers=1, d_model=16, n_heads=2, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
