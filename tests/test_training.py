import csv
import json
import math

import pytest
import torch

from helpers import run_main
from mdlm_kit.eval.likelihood import evaluate_likelihood
from mdlm_kit.io import load_checkpoint


def _val_curve(out):
    rows = list(csv.DictReader(open(next(out.glob("csv/version_*/metrics.csv")))))
    return [(int(r["step"]), float(r["val/nelbo"])) for r in rows if r.get("val/nelbo")]


def test_fit_writes_last_ckpt_logs_and_config(trained):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    assert any(trained.glob("tensorboard/version_*/events.out.tfevents.*"))
    rows = list(csv.DictReader(open(next(trained.glob("csv/version_*/metrics.csv")))))
    keys = set().union(*(r.keys() for r in rows))
    assert {"train/nelbo", "train/tokens_per_s", "val/nelbo", "val/ppl"} <= keys
    assert any(float(r["train/tokens_per_s"]) > 0 for r in rows if r.get("train/tokens_per_s"))


def test_validation_nelbo_falls(trained):
    curve = _val_curve(trained)
    assert len(curve) >= 5
    steps, values = zip(*curve)
    assert values[-1] < values[0] - 0.1, curve
    assert min(values[-2:]) < min(values[:2]), curve


def test_report_beats_the_unigram_entropy_and_is_consistent(trained, capfd):
    proc = run_main(capfd, "report", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    # an untrained model (zero output layer) scores log(V - 1) per token; training must beat token frequencies
    assert rep["val_nelbo"] < rep["unigram_entropy"] - 3 * rep["stderr"]
    assert rep["val_bpc"] == pytest.approx(rep["val_nelbo"] * rep["val_tokens"] / math.log(2) / rep["val_chars"])
    assert rep["ppl"] == pytest.approx(math.exp(rep["val_nelbo"]))
    assert rep["unigram_ratio"] == pytest.approx(rep["val_nelbo"] / rep["unigram_entropy"])
    # the run went its full 300 steps (configs/debug.yaml)
    assert (rep["steps"], rep["max_steps"], rep["stopped_early"], rep["stop_reason"]) == (300, 300, False, None)
    assert "mdlm-kit: warning" not in proc.stderr
    lo, hi = rep["ci95"]
    assert lo == pytest.approx(math.exp(rep["val_nelbo"] - 1.96 * rep["stderr"]))
    assert lo < rep["ppl"] < hi and hi == pytest.approx(math.exp(rep["val_nelbo"] + 1.96 * rep["stderr"]))


def test_fit_ends_with_where_the_checkpoint_is_and_how_far_it_got(trained):
    lines = (trained / "fit.stderr").read_text().strip().splitlines()
    last = trained / "checkpoints" / "last.ckpt"
    done = [ln for ln in lines if ln.startswith("mdlm-kit: fit done:")]
    assert len(done) == 1 and f"last.ckpt at {last}" in done[0] and "300 of 300 steps" in done[0], lines[-5:]
    value = float(done[0].split("validation NELBO ")[1].split()[0])
    assert value == pytest.approx(_val_curve(trained)[-1][1], abs=5e-4)
    ratio, unigram = done[0].split("nats/token, ")[1].split(" of the unigram entropy ")
    assert float(ratio) == pytest.approx(value / float(unigram), abs=2e-3) and float(ratio) < 0.97
    assert not any("warning" in ln for ln in lines), lines  # it learned context: no plateau warning


def test_a_fit_cut_by_max_time_says_so(tmp_path, cache_root, capfd):
    """max_time stops the run long before max_steps: fit warns with the step and the reason, and the report's JSON
    carries steps, max_steps, stopped_early and the reason (and warns too)."""
    from helpers import CONFIGS, write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=3, lines=40)
    out = tmp_path / "run"
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(out), "--trainer.max_steps", "100000",
                   "--trainer.max_time", "00:00:00:03")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    cut = [ln for ln in lines if "training stopped early" in ln]
    assert len(cut) == 1 and "of 100000: trainer.max_time reached after" in cut[0], lines[-5:]
    steps = int(cut[0].split("early at step ")[1].split()[0])
    assert 0 < steps < 100000
    assert any(ln.startswith("mdlm-kit: fit done:") and f"{steps} of 100000 steps" in ln for ln in lines)
    proc = run_main(capfd, "report", "--checkpoint", str(out / "checkpoints" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (rep["steps"], rep["max_steps"], rep["stopped_early"]) == (steps, 100000, True)
    assert rep["stop_reason"].startswith("trainer.max_time reached after")
    assert f"is from step {steps} of 100000: trainer.max_time reached" in proc.stderr


def test_fit_warns_when_the_bound_is_still_at_the_unigram_entropy(tmp_path, cache_root, capfd):
    """Two steps learn nothing: the closing lines say the model has not learned context and what to change."""
    from helpers import CONFIGS, write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=3, lines=40)
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
                   "--trainer.val_check_interval", "2", "--model.backbone.conv_kernel", "0", "--model.unigram_bias",
                   "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    done = next(ln for ln in lines if ln.startswith("mdlm-kit: fit done:"))
    assert "2 of 2 steps" in done and float(done.split("nats/token, ")[1].split()[0]) >= 0.97
    assert "training stopped early" not in proc.stderr
    assert lines[-1].startswith("mdlm-kit: warning: the validation NELBO is within 3% of the unigram entropy")
    assert "has not learned to use context" in lines[-1] and "trainer.max_steps" in lines[-1]
    assert "model.backbone.conv_kernel: 3" in lines[-1]  # a model without the local convolution: the fix is named
    assert "model.unigram_bias: true" in lines[-1]  # nor the unigram bias


def test_progress_bar_counts_steps_not_epochs():
    """Lightning's bar titles a step-limited run "Epoch 0/-2" (max_epochs = -1); the CLI's shows "Epoch 0" and
    the step against max_steps."""
    import lightning as L

    from mdlm_kit.callbacks import StepProgressBar
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.models import Backbone

    model = LanguageModel(vocab_size=11, backbone=Backbone("debug"))
    bar = StepProgressBar()
    trainer = L.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, max_steps=500)
    bar.setup(trainer, model, "fit")
    assert bar.get_metrics(trainer, model)["step"] == "0/500"
    from rich.progress import Progress

    for max_epochs, title in ((-1, "Epoch 0"), (None, "Epoch 0"), (3, "Epoch 0/2")):
        trainer.fit_loop.max_epochs = max_epochs  # -1 in a running step-limited fit
        bar.progress = Progress()  # what Lightning's bar holds while training
        bar.train_progress_bar_id = bar.progress.add_task("Epoch 0/-2", total=500)
        bar.retitle(trainer)
        assert bar.progress.tasks[0].description == title


def test_checkpoint_holds_ema_weights_and_the_tokenizer(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt  # EMAWeightAveraging stored the raw weights beside the averaged ones
    differs = [not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"]]
    assert any(differs)
    model, dm = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    assert dm.tokenizer is None or dm.tokenizer.kind == "char"
    dm.prepare()
    assert dm.tokenizer.kind == "char" and dm.model_vocab_size == model.config.vocab_size


def test_evaluation_does_not_depend_on_batch_size(trained):
    model, dm = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    val = dm.blocks("val")[:24]
    a = evaluate_likelihood(model, val, batch_size=1, seed=3).summary()
    b = evaluate_likelihood(model, val, batch_size=8, seed=3).summary()
    c = evaluate_likelihood(model, val, batch_size=8, seed=4).summary()
    assert a["nelbo"] == pytest.approx(b["nelbo"], rel=1e-6)
    assert a["nelbo"] != c["nelbo"]
    assert abs(a["nelbo"] - c["nelbo"]) < 4 * math.hypot(a["stderr"], c["stderr"])


def test_validate_subcommand_evaluates_a_checkpoint(trained, tmp_path, capfd):
    from helpers import CONFIGS

    proc = run_main(capfd,
        "validate", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(trained.parent / "corpus"),
        "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/nelbo" in proc.stdout
    # the validated number is the trained model's, far below the untrained log(V - 1)
    value = float(proc.stdout.split("val/nelbo")[1].split()[1].strip("│|"))
    assert value < _val_curve(trained)[0][1]


def _loss_curve(corpus, masked_only: bool, steps: int = 200, lr: float = 3e-3, seed: int = 0) -> list[float]:
    from functools import partial

    import lightning as L

    from mdlm_kit.data import TextDataModule
    from mdlm_kit.families import MaskedDiffusion
    from mdlm_kit.lightning import LanguageModel, WarmupCosine
    from mdlm_kit.models import Backbone

    class Record(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    L.seed_everything(seed, verbose=False)
    dm = TextDataModule(str(corpus), tokenizer="char", seq_len=64, batch_size=16)
    model = LanguageModel(dm.model_vocab_size, Backbone("debug"), MaskedDiffusion(masked_only=masked_only),
                          optimizer=partial(torch.optim.AdamW, lr=lr),
                          lr_scheduler=partial(WarmupCosine, warmup_steps=10))
    rec = Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[rec], gradient_clip_val=1.0)
    trainer.fit(model, datamodule=dm)
    return rec.losses


def test_masked_only_head_trains_the_same_loss_curve(tmp_path, cache_root):
    """The debug model trained 200 steps with the masked-only head and fused cross-entropy on and off:
    the same curve, up to float32 rounding (measured: at most 9e-6 nats; another data order differs by
    0.01 to 0.03 per 20-step average)."""
    from helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    fast, full = _loss_curve(corpus, True), _loss_curve(corpus, False)
    assert len(fast) == len(full) == 200
    diffs = [abs(a - b) for a, b in zip(fast, full)]
    assert max(diffs) < 1e-4, max(diffs)
    assert sum(full[-20:]) / 20 < sum(full[:20]) / 20 - 0.4  # and it did train


def test_bf16_mixed_precision_with_clipping_trains(tmp_path, cache_root, capfd):
    """The recipes' AdamW (not fused: a fused optimizer cannot be clipped under mixed precision) trains under
    bf16-mixed with clipping."""
    from helpers import CONFIGS, write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=3, lines=40)
    common = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
              "--trainer.max_steps", "3", "--trainer.precision", "bf16-mixed", "--trainer.val_check_interval", "3"]
    proc = run_main(capfd, *common, "--trainer.default_root_dir", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 of 3 steps" in proc.stderr


def test_unigram_bias_starts_the_model_at_the_training_frequencies(tmp_path):
    """model.unigram_bias: before any step the model predicts the training split's smoothed token
    frequencies at every masked position, so its loss starts at the unigram cross-entropy, not log V."""
    import numpy as np

    from helpers import write_corpus
    from mdlm_kit.data import TextDataModule
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.models import Backbone
    from mdlm_kit.objective import subs_log_probs

    corpus = write_corpus(tmp_path / "corpus", n_docs=3, lines=40)
    dm = TextDataModule(corpus=str(corpus), tokenizer="char", seq_len=32, val_fraction=0.2)
    model = LanguageModel(vocab_size=dm.model_vocab_size, backbone=Backbone("debug"), unigram_bias=True)
    model.init_unigram_bias(dm)
    blocks = dm.blocks("train")
    lens = blocks.lengths(slice(0, len(blocks)))
    ids = np.concatenate([b[:n] for b, n in zip(blocks[0 : len(blocks)], lens)])
    counts = np.bincount(ids, minlength=dm.model_vocab_size)  # counted here, independently of token_counts
    assert counts[dm.mask_id] == 0
    expected = np.log((counts + 0.5) / (counts + 0.5)[: dm.mask_id].sum())[: dm.mask_id]
    z = torch.full((1, 32), dm.mask_id)
    logp = subs_log_probs(model.backbone(z), dm.mask_id)[0].double()  # (L, V), the mask column at -inf
    assert torch.allclose(logp[:, : dm.mask_id], torch.from_numpy(expected).expand(32, -1), atol=1e-5)
    # the masked-token loss of the fresh model is the unigram cross-entropy of the training tokens
    p = counts[: dm.mask_id] / counts.sum()
    ce = -(p[p > 0] * expected[p > 0]).sum()
    x0 = torch.from_numpy(ids[: 32 * 8].reshape(8, 32).astype(np.int64))
    nll = -subs_log_probs(model.backbone(torch.full_like(x0, dm.mask_id)), dm.mask_id).gather(-1, x0[..., None])
    assert abs(nll.double().mean().item() - ce) < 0.25  # 256 tokens of a 3-document corpus
    assert ce < math.log(dm.model_vocab_size - 1) - 0.3  # and far below the zero-initialized model's log V
    fresh = LanguageModel(vocab_size=dm.model_vocab_size, backbone=Backbone("debug"))
    assert torch.count_nonzero(fresh.backbone.final.linear.bias) == 0


def test_fit_with_unigram_bias_keeps_it_in_the_checkpoint(tmp_path, cache_root, capfd):
    """The bias is set when fit starts (after the data is read): after one step at a negligible learning rate
    the checkpoint holds the log frequencies of the training tokens."""
    import numpy as np

    from helpers import CONFIGS, write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=3, lines=40)
    out = tmp_path / "run"
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(out), "--trainer.max_steps", "1", "--model.optimizer.lr", "1e-9",
                   "--trainer.val_check_interval", "1", "--model.unigram_bias", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, dm = load_checkpoint(str(out / "checkpoints" / "last.ckpt"))
    counts = dm.token_counts("train").astype(np.float64)
    expected = torch.from_numpy(np.log((counts + 0.5) / (counts + 0.5).sum())).float()
    expected[dm.mask_id] = 0.0
    assert model.hparams.unigram_bias is True
    assert torch.allclose(model.backbone.final.linear.bias, expected, atol=1e-5)
