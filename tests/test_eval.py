"""The perplexity benchmark, the autoregressive baseline, generative perplexity and likelihood checks."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from helpers import CONFIGS, random_dit, run_cli, run_main, write_corpus
from mdlm_kit.eval.genppl import diversity, score
from mdlm_kit.eval.likelihood import evaluate_likelihood, ratio_stderr
from mdlm_kit.io import load_checkpoint
from mdlm_kit.objective import autoregressive_nll


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _one_line_error(proc, match: str, status: int = 2):
    assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("mdlm-kit: error: ") and match in last, last


@pytest.fixture(scope="module")
def trained_ar(tmp_path_factory, cache_root):
    """The autoregressive baseline trained with the same CLI, recipe, corpus and budget as ``trained``."""
    root = tmp_path_factory.mktemp("train_ar")
    corpus = write_corpus(root / "corpus")  # the same six-sentence corpus as ``trained``
    out = root / "run"
    proc = run_cli(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--model.family", "Autoregressive",
        "--data.corpus", str(corpus), "--trainer.default_root_dir", str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints" / "last.ckpt"


# ---- the autoregressive objective is an exact likelihood ----


def _causal(vocab=4, seed=0):
    model = random_dit(vocab_size=vocab + 1, n_layers=2, d_model=32, max_seq_len=8, seed=seed)
    for block in model.blocks:
        block.attn.causal = True
    model.causal = True
    return model


def test_autoregressive_nll_is_a_normalized_distribution():
    """Summed over every sequence of length 4 over 4 tokens, exp(-NLL) is 1: a proper distribution
    (a missing causal mask or a shifted target would not normalize)."""
    model = _causal()
    seqs = torch.tensor(list(itertools.product(range(4), repeat=4)))
    with torch.no_grad():
        nll = autoregressive_nll(model, seqs, start_id=4).per_seq
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_autoregressive_nll_matches_the_chain_rule_one_prefix_at_a_time():
    model = _causal(vocab=6, seed=1)
    x = torch.randint(0, 6, (3, 7))
    with torch.no_grad():
        fast = autoregressive_nll(model, x, start_id=6).per_seq
        slow = torch.zeros(3, dtype=torch.float64)
        for i in range(7):
            prefix = torch.cat([torch.full((3, 1), 6), x[:, :i]], 1)
            logits = model(prefix)[:, -1].float()
            logits[:, 6] = float("-inf")
            slow -= torch.log_softmax(logits, -1).gather(-1, x[:, i : i + 1]).squeeze(-1).double()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_ratio_stderr_matches_the_spread_of_the_ratio_over_replications():
    """The error bar of sum(nats) / sum(tokens) over units of unequal length is what repeated draws show."""
    rng = np.random.default_rng(0)
    ratios, errs = [], []
    for _ in range(600):
        counts = torch.tensor(rng.integers(5, 80, 200), dtype=torch.float64)
        noise = torch.tensor(rng.normal(0, 1, 200)) * counts.sqrt() * 2 + torch.tensor(rng.normal(0, 5, 200))
        sums = counts * 2.0 + noise
        ratios.append(float(sums.sum() / counts.sum()))
        errs.append(ratio_stderr(sums, counts))
    spread = float(np.std(ratios, ddof=1))
    assert np.mean(errs) == pytest.approx(spread, rel=0.1)
    # a naive mean of per-unit ratios' error bar is wrong here (short units are noisier)
    naive = float((sums / counts).std() / math.sqrt(200))
    assert abs(naive - spread) > 0.1 * spread


# ---- mdlm-kit ppl ----


def test_ppl_reports_a_bound_with_error_bars(trained_ckpt, tmp_path, capfd):
    plot = tmp_path / "buckets.png"
    out = _json(run_main(capfd, "ppl", "--checkpoint", str(trained_ckpt), "--plot", str(plot), "--num_buckets", "10"))
    for key in ("nelbo", "ppl", "stderr", "ci95", "num_tokens", "num_sequences", "tokens_per_second", "protocol"):
        assert key in out
    assert out["ppl"] == pytest.approx(math.exp(out["nelbo"]))
    lo, hi = out["ci95"]
    assert lo == pytest.approx(math.exp(out["nelbo"] - 1.96 * out["stderr"]))
    assert hi == pytest.approx(math.exp(out["nelbo"] + 1.96 * out["stderr"]))
    assert out["protocol"]["estimator"] == "time" and out["protocol"]["num_t_samples"] == 1
    assert out["model"] == "diffusion" and out["data"]["split"] == "val"
    # the buckets and the endpoint term add up to the bound
    assert sum(out["buckets"]) + out["endpoint_nats_per_token"] == pytest.approx(out["nelbo"], abs=1e-5)  # 6 decimals
    assert len(out["buckets"]) == 10
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    # the same numbers as the library function on the checkpoint's validation blocks
    model, dm = load_checkpoint(trained_ckpt)
    res = evaluate_likelihood(model, dm.blocks("val"), batch_size=7, estimator="time")
    assert res.nelbo == pytest.approx(out["nelbo"], rel=1e-6)
    assert res.stderr == pytest.approx(out["stderr"], rel=1e-6)


def test_report_loads_the_checkpoint_once_and_prints_ppls_numbers(trained_ckpt, monkeypatch, capsys):
    import mdlm_kit.eval.report as report_module
    from mdlm_kit.eval.ppl import perplexity

    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return load_checkpoint(*args, **kwargs)

    monkeypatch.setattr(report_module, "load_checkpoint", counting)
    monkeypatch.setattr("mdlm_kit.io.load_checkpoint", counting)  # where ppl looks it up
    rep = report_module.report(str(trained_ckpt), batch_size=16)
    assert len(calls) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rep
    ppl = perplexity(str(trained_ckpt), batch_size=16, progress=False)
    pairs = {"val_nelbo": "nelbo", "ppl": "ppl", "stderr": "stderr", "ci95": "ci95", "val_tokens": "num_tokens",
             "protocol": "protocol"}
    assert {k: rep[k] for k in pairs} == {k: ppl[v] for k, v in pairs.items()}


def test_more_time_samples_shrink_the_error_bar_and_agree(trained_ckpt):
    model, dm = load_checkpoint(trained_ckpt)
    val = dm.blocks("val")[:64]
    one = evaluate_likelihood(model, val, estimator="time", num_t_samples=1, seed=1)
    eight = evaluate_likelihood(model, val, estimator="time", num_t_samples=8, seed=1)
    other = evaluate_likelihood(model, val, estimator="time", num_t_samples=1, seed=2)
    assert eight.stderr < one.stderr / 2
    assert abs(one.nelbo - eight.nelbo) < 3 * math.hypot(one.stderr, eight.stderr)
    assert abs(one.nelbo - other.nelbo) < 3 * math.hypot(one.stderr, other.stderr)
    assert one.nelbo != other.nelbo


def test_ppl_on_another_file_uses_the_checkpoint_tokenizer(trained_ckpt, tmp_path, capfd):
    text = "the rest is silence.\nall the world is a stage.\n" * 40
    (tmp_path / "eval.txt").write_text(text)
    out = _json(run_main(capfd, "ppl", "--checkpoint", str(trained_ckpt), "--data", str(tmp_path / "eval.txt"),
                        "--seq_len", "32", "--estimator", "count"))
    assert out["data"]["split"] == "all" and out["data"]["seq_len"] == 32
    # the whole file, BOS + text + EOS, cut into 32-token blocks (char tokenizer: one token per character)
    assert out["num_tokens"] == (len(text) + 2) // 32 * 32


def test_ppl_discrete_time_bound_sits_above_the_continuous_one(trained_ckpt):
    """Same times and masks for every T (common random numbers): the T-step bound decreases toward the
    continuous one as T grows (MDLM, table 8)."""
    model, dm = load_checkpoint(trained_ckpt)
    val = dm.blocks("val")[:64]
    res = {T: evaluate_likelihood(model, val, estimator="time", num_t_samples=4, num_steps=T).nelbo
           for T in (2, 10, 100)}
    cont = evaluate_likelihood(model, val, estimator="time", num_t_samples=4)
    assert res[2] > res[10] > cont.nelbo
    # at T = 100 the gap (about 1% of T = 10's) is below the Monte Carlo error; the objective tests
    # measure it exactly by enumeration
    assert abs(res[100] - cont.nelbo) < 3 * cont.stderr


def test_autoregressive_baseline_trains_with_the_same_cli_and_beats_the_bound(trained_ar, trained_ckpt, capfd):
    ar = _json(run_main(capfd, "ppl", "--checkpoint", str(trained_ar)))
    diff = _json(run_main(capfd, "ppl", "--checkpoint", str(trained_ckpt), "--num_t_samples", "4"))
    assert ar["model"] == "autoregressive" and ar["protocol"]["estimator"] == "exact"
    assert ar["num_tokens"] == diff["num_tokens"]  # the same blocks
    assert ar["nelbo"] < diff["nelbo"] - 3 * math.hypot(ar["stderr"], diff["stderr"])
    model, dm = load_checkpoint(trained_ar)
    assert model.backbone.causal and model.kind == "autoregressive"
    x = torch.from_numpy(dm.blocks("val")[:8].astype(np.int64))
    with torch.no_grad():
        exact = autoregressive_nll(model.backbone, x, model.mask_id).per_seq.sum() / x.numel()
    ev = evaluate_likelihood(model, dm.blocks("val")[:8])
    assert ev.nelbo == pytest.approx(float(exact), rel=1e-9)


# ---- generative perplexity ----


def test_diversity_statistics_on_known_token_lists():
    d = diversity([[1, 1, 1, 1], [1, 2, 3, 4]], max_n=2)
    assert d["entropy"] == pytest.approx(math.log(4) / 2)
    assert d["distinct_1"] == pytest.approx((1 / 4 + 1) / 2)
    assert d["distinct_2"] == pytest.approx((1 / 3 + 1) / 2)


def test_score_cuts_windows_and_leaves_the_context_out():
    class Scorer:  # each token's NLL is its id
        window = 3
        seen = []

        def window_nll(self, window, scored):
            self.seen.append((window, scored.tolist()))
            return float(sum(t for t, s in zip(window, scored.tolist()) if s))

    sc = Scorer()
    assert score(sc, [1, 2, 3, 4, 5, 6, 7], context=4) == (5 + 6 + 7, 3)
    assert sc.seen == [([1, 2, 3], [False] * 3), ([4, 5, 6], [False, True, True]), ([7], [True])]
    assert score(sc, [], context=0) == (0.0, 0)


def test_genppl_under_the_autoregressive_baseline_scores_the_sampled_tokens(trained_ckpt, trained_ar, tmp_path, capfd):
    samples = tmp_path / "s.jsonl"
    proc = run_main(capfd, "generate", "--checkpoint", str(trained_ckpt), "--num_samples", "6", "--length", "40",
                   "--seed", "0", "--output", str(samples))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = _json(run_main(capfd, "genppl", "--samples", str(samples), "--scorer", str(trained_ar)))
    assert out["scoring"] == "sampled token ids (same tokenizer)"
    assert out["num_samples"] == 6 and out["num_scored_tokens"] == 6 * 39  # BOS is context, not scored
    # by hand: the AR model's NLL of each sample's tokens after BOS
    model, _ = load_checkpoint(trained_ar)
    recs = [json.loads(line) for line in samples.read_text().splitlines()]
    x = torch.tensor([r["tokens"] for r in recs])
    with torch.no_grad():
        logits = model.backbone(torch.cat([torch.full((6, 1), model.mask_id), x[:, :-1]], 1)).float()
    logits[..., model.mask_id] = float("-inf")
    nll = -torch.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)[:, 1:].double()
    assert out["gen_nll"] == pytest.approx(float(nll.sum() / nll.numel()), rel=1e-5)
    assert out["gen_ppl"] == pytest.approx(math.exp(out["gen_nll"]))
    assert out["ci95"][0] < out["gen_ppl"] < out["ci95"][1]
    assert 0 < out["entropy"] <= math.log(39) and 0 < out["distinct_1"] <= 1


def test_genppl_with_a_hugging_face_causal_lm_retokenizes_the_text(tmp_path, capfd):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>"] + list("abcdefghijklmnopqrstuvwxyz .?"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    folder = tmp_path / "scorer"
    lm.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    records = [
        {"text": "the rest is silence."},
        {"text": "all the world is a stage, and more text than one window holds"},
        # a prompted sample: the prompt is context, only the completion is scored
        {"text": "now is the winter of our discontent", "prompt": "now is the",
         "completion": " winter of our discontent"},
    ]
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = _json(run_main(capfd, "genppl", "--samples", str(samples), "--scorer", str(folder)))
    assert out["scoring"] == "retokenized text"

    def enc(t):
        return hf_tok(t, add_special_tokens=False)["input_ids"]

    seqs = [(enc(r["text"]), 0) for r in records[:2]]
    seqs.append((enc(records[2]["prompt"]) + enc(records[2]["completion"]), len(enc(records[2]["prompt"]))))
    assert out["num_scored_tokens"] == sum(len(ids) - ctx for ids, ctx in seqs)
    total = 0.0
    with torch.no_grad():
        for ids, ctx in seqs:
            for lo in range(0, len(ids), 15):  # windows of n_positions - 1 tokens, each after the EOS
                x = torch.tensor([[0, *ids[lo : lo + 15]]])
                logp = torch.log_softmax(lm(input_ids=x).logits[0, :-1].float(), -1)
                nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)
                keep = torch.arange(lo, lo + nll.numel()) >= ctx
                total += float(nll[keep].sum())
    assert out["gen_nll"] == pytest.approx(total / out["num_scored_tokens"], rel=1e-5)


# ---- bad input ----


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n \n")
    (root / "notjson.jsonl").write_text("{not json}\n")
    (root / "short.txt").write_text("ab\ncd\n")
    return root


@pytest.mark.parametrize(
    "argv, match",
    [
        (["ppl", "--data", "/no/such/data.txt"], "no such file or folder: /no/such/data.txt"),
        (["ppl", "--data", "{files}/empty.txt"], "empty corpus"),
        (["ppl", "--data", "{files}/short.txt"], "fewer than one block"),
        (["ppl", "--seq_len", "999"], "--seq_len 999 does not fit the model"),
        (["ppl", "--split", "test"], "unknown split 'test'"),
        (["ppl", "--estimator", "count", "--num_steps", "10"], "needs continuous time"),
        (["ppl", "--num_t_samples", "0"], "must be >= 1"),
        (["ppl", "--plot", "/no/such/dir/p.png"], "folder /no/such/dir does not exist"),
        (["ppl", "--estimator", "bogus"], "Got value: bogus"),
        (["ppl", "--device", "tpu"], "Got value: tpu"),
        (["ppl", "--max_sequences", "1"], "--max_sequences must be >= 2"),
        (["genppl", "--samples", "/no/such.jsonl", "--scorer", "{ckpt}"], "no such file: /no/such.jsonl"),
        (["genppl", "--samples", "{files}/notjson.jsonl", "--scorer", "{ckpt}"], "not valid JSON"),
        (["genppl", "--samples", "{files}/s.jsonl", "--scorer", "{ckpt}"], "this command needs an autoregressive"),
        (["genppl", "--samples", "{files}/s.jsonl", "--scorer", "no-such-model-xyz"], "cannot load a causal LM"),
        (["generate", "--checkpoint", "{ar}"], "this command needs a masked diffusion model"),
        (["report", "--checkpoint", "{ar}"], "this command needs a masked diffusion model"),
        (["check-likelihood", "--source", "zipf"], "Got value: zipf"),
    ],
    ids=["data-missing", "data-empty", "data-too-short", "seq-len-mismatch", "bad-split", "count-discrete",
         "k-zero", "plot-folder-missing", "unknown-estimator", "unknown-device", "one-sequence", "samples-missing",
         "samples-not-json", "scorer-wrong-kind",
         "scorer-offline", "generate-ar", "report-ar", "unknown-source"],
)
def test_bad_input_gives_one_line(argv, match, files, trained_ckpt, trained_ar, capfd):
    (files / "s.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    argv = [a.format(files=files, ckpt=trained_ckpt, ar=trained_ar) for a in argv]
    if argv[0] == "ppl":
        argv[1:1] = ["--checkpoint", str(trained_ckpt)]
    _one_line_error(run_main(capfd, *argv), match)


# ---- likelihood checks on sources of known entropy ----


def test_markov_source_entropy_is_exact():
    from mdlm_kit.eval.sources import make_source

    src = make_source("markov")
    # the block entropy by enumerating every length-4 string
    probs = np.array([math.exp(-src.nll("".join(s))) for s in itertools.product(src.alphabet, repeat=4)])
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert -(probs * np.log(probs)).sum() == pytest.approx(src.block_entropy(4), abs=1e-10)
    # the stationary distribution is stationary
    np.testing.assert_allclose(src.stationary @ src.transition, src.stationary, atol=1e-12)
    iid = make_source("iid")
    assert iid.entropy_rate == pytest.approx(iid.stationary_entropy)


@pytest.fixture(scope="module")
def markov_model(tmp_path_factory, cache_root):
    from mdlm_kit.eval.check import train_on_source

    root = tmp_path_factory.mktemp("markov")
    return train_on_source(root / "corpus.jsonl", "markov", steps=250, num_docs=120, blocks_per_doc=4)


def test_the_bound_is_respected_and_learns_beyond_symbol_frequencies(markov_model):
    from mdlm_kit.eval.check import compare_with_truth

    model, dm, src = markov_model
    res = compare_with_truth(model, dm, src, eval_blocks=48)
    assert res["bound_respected"] and res["nelbo"] >= res["true_entropy"] - 3 * res["stderr"]
    assert res["paired_gap"] >= -3 * res["paired_gap_stderr"]
    # the model uses context: better than the symbol entropy, which ignores it
    assert res["nelbo"] < src.stationary_entropy - 3 * res["stderr"]
    # and the time estimator agrees with the count estimator
    res_t = compare_with_truth(model, dm, src, eval_blocks=48, estimator="time", num_t_samples=8)
    assert abs(res_t["nelbo"] - res["nelbo"]) < 3 * math.hypot(res["stderr"], res_t["stderr"])


def test_the_check_catches_an_underweighted_objective(markov_model, monkeypatch):
    """With the NELBO's weights cut by 20% (a plausible bug), the 'bound' drops below the true entropy
    and the check says so."""
    import mdlm_kit.objective as objective
    from mdlm_kit.eval.check import compare_with_truth

    model, dm, src = markov_model
    true_weights = objective.count_weights
    monkeypatch.setattr(objective, "count_weights", lambda *a, **k: 0.8 * true_weights(*a, **k))
    res = compare_with_truth(model, dm, src, eval_blocks=48)
    assert not res["bound_respected"]
