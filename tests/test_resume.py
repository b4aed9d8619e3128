"""Crash-safe training: a run killed with SIGKILL resumes with the losses of a run never killed; a checkpoint
write killed part-way leaves the previous checkpoint intact; a non-finite loss stops the run (or skips the step)."""

import math
import re

import pytest
import torch

from helpers import CONFIGS, ROOT, read_records, run_cli, run_main, write_corpus

pytestmark = pytest.mark.slow

END = 30  # optimizer steps of every run here; checkpoints every 5, validation every 10

# dropout draws from the global generator (restored from the checkpoint), the learning rate warms up then decays
# (scheduler state), EMA averages the weights (callback state), 8 batches per epoch (data position mid-epoch)
CONFIG = """
trainer:
  max_steps: {end}
  val_check_interval: 10
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
      init_args: {{decay: 0.9}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 1, every_n_train_steps: 5}}
    - class_path: helpers.RecordBatches
      init_args: {{path: {rec}}}
model:
  backbone:
    dropout: 0.1
  lr_scheduler:
    class_path: mdlm_kit.lightning.WarmupCosine
    init_args:
      warmup_steps: 5
      decay_steps: 25
data:
  batch_size: 64
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, cache_root):
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus")


def _fit(tmp, name, corpus, *extra, rec=None, end=END, capfd=None):
    """A run of CONFIG: in this process with ``capfd``, else in its own (a run that is killed)."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(CONFIG.format(end=end, rec=rec or tmp / f"{name}.rec"))
    args = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--config", str(cfg), "--data.corpus", str(corpus),
            "--trainer.default_root_dir", str(tmp / name), *extra]
    if capfd is not None:
        return run_main(capfd, *args)
    return run_cli(*args, timeout=300, env={"PYTHONPATH": str(ROOT / "tests")})


@pytest.fixture(scope="module")
def full(tmp_path_factory, corpus):
    """The uninterrupted run's records, one per step."""
    tmp = tmp_path_factory.mktemp("full")
    proc = _fit(tmp, "full", corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(tmp / "full.rec")
    assert [r["step"] for r in records] == list(range(1, END + 1))
    return records


def _step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_a_run_killed_with_sigkill_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path, corpus, full, capfd):
    proc = _fit(tmp_path, "run", corpus, "--trainer.callbacks+=helpers.KillAt", "--trainer.callbacks.step", "17")
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no handler, no cleanup ran
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _step(last) == 15
    killed = read_records(tmp_path / "run.rec")
    assert killed == full[:17]  # the same run up to the kill

    proc = _fit(tmp_path, "run", corpus, "--ckpt_path", "last", rec=tmp_path / "resumed.rec", capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_records(tmp_path / "resumed.rec")
    # steps 16 and 17 again, then on to the end: the same samples and bit-identical losses
    assert resumed == full[15:]
    assert _step(last) == END


@pytest.mark.parametrize("during, saved", [("training", 12), ("validation", 11)])
def test_sigterm_saves_the_current_step_and_the_run_resumes_from_it(tmp_path, corpus, full, during, saved, capfd):
    """A cluster's SIGTERM (preemption, a time limit) after step 12, or during the validation after step 10:
    the run stops at the end of the current step (validation finishes first), last.ckpt holds it, the exit
    status says so (128 + 15), and resuming continues exactly."""
    step = 12 if during == "training" else 10
    proc = _fit(tmp_path, "run", corpus, "--trainer.callbacks+=helpers.KillAt", "--trainer.callbacks.step", str(step),
                "--trainer.callbacks.signum", "15", "--trainer.callbacks.during", during)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("mdlm-kit: stopped by SIGTERM")
    assert _step(tmp_path / "run" / "checkpoints" / "last.ckpt") == saved
    proc = _fit(tmp_path, "run", corpus, "--ckpt_path", "last", rec=tmp_path / "rest.rec", capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_records(tmp_path / "run.rec")[:saved] + read_records(tmp_path / "rest.rec") == full


def test_a_stop_in_the_middle_of_gradient_accumulation_waits_for_the_optimizer_step(tmp_path, corpus, capfd):
    """Two batches per optimizer step (4 steps an epoch), SIGTERM after the first batch of step 7 (batch 4 of
    epoch 1): the run takes that step before it saves and stops, so the resumed run goes on from a whole step."""
    acc = ["--trainer.accumulate_grad_batches", "2"]
    proc = _fit(tmp_path, "full", corpus, *acc, end=12, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fit(tmp_path, "run", corpus, *acc, "--trainer.callbacks+=helpers.KillAt", "--trainer.callbacks.step",
                "6", "--trainer.callbacks.batch", "4", "--trainer.callbacks.signum", "15", end=12)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert _step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 7
    proc = _fit(tmp_path, "run", corpus, *acc, "--ckpt_path", "last", rec=tmp_path / "rest.rec", end=12, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, part, rest = (read_records(tmp_path / f"{n}.rec") for n in ("full", "run", "rest"))
    assert len(part) == 14 and part + rest == full  # 14 batches = 7 whole steps, then the rest as if never stopped


def test_a_save_at_the_last_step_leaves_the_validation_checkpoint_of_that_step(tmp_path, corpus, capfd):
    """The end-of-run save must not make ModelCheckpoint skip the save it owes the validation at the same step."""
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "4",
                   "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert _step(ckpts / "last.ckpt") == 4


def test_validate_takes_a_weights_only_checkpoint_and_a_resume_ignores_unknown_settings(tmp_path, corpus, full, capfd):
    """Preflight refuses to resume training from weights alone, but validate needs nothing more; and a checkpoint
    holding a model setting this version lacks (a newer version's) resumes with a warning, not a traceback."""
    proc = _fit(tmp_path, "run", corpus, end=5, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    weights = {k: v for k, v in ckpt.items() if k not in ("optimizer_states", "lr_schedulers", "loops", "callbacks")}
    torch.save(weights, tmp_path / "weights.ckpt")
    proc = run_main(capfd, "validate", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(tmp_path / "val"), "--trainer.limit_val_batches", "1",
                   "--ckpt_path", str(tmp_path / "weights.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _fit(tmp_path, "val2", corpus, "--ckpt_path", str(tmp_path / "weights.ckpt"), end=6, capfd=capfd)
    assert proc.returncode == 2 and "holds weights only" in proc.stderr.strip().splitlines()[-1]

    ckpt["hyper_parameters"]["a_future_setting"] = 3
    torch.save(ckpt, tmp_path / "future.ckpt")
    proc = _fit(tmp_path, "future", corpus, "--ckpt_path", str(tmp_path / "future.ckpt"), end=6, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ignoring model settings this version does not know: a_future_setting" in proc.stderr
    assert read_records(tmp_path / "future.rec") == full[5:6]


def test_resuming_without_the_generators_state_would_change_the_losses(tmp_path, corpus, full, capfd):
    """The dropout noise of the resumed steps comes from the checkpoint's generator state: without it (the
    state deleted from the checkpoint) the losses differ, so the test above would catch its loss."""
    proc = _fit(tmp_path, "run", corpus, end=15, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 15 and "rng_states" in ckpt
    del ckpt["rng_states"]
    torch.save(ckpt, tmp_path / "no_rng.ckpt")
    proc = _fit(tmp_path, "other", corpus, "--ckpt_path", str(tmp_path / "no_rng.ckpt"), end=17, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_records(tmp_path / "other.rec")
    assert [r["index"] for r in resumed] == [r["index"] for r in full[15:17]]  # same data position
    assert [r["loss"] for r in resumed] != [r["loss"] for r in full[15:17]]


def test_a_checkpoint_write_killed_part_way_leaves_the_previous_checkpoint(tmp_path, corpus, full, capfd):
    proc = _fit(tmp_path, "run", corpus, "--trainer.callbacks+=helpers.KillDuringSave",
                "--trainer.callbacks.step", "10")
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    # the killed write went to a temporary file: both checkpoints of step 5 are whole and loadable
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert _step(ckpts / "last.ckpt") == 5 and _step(ckpts / "epoch=0-step=5.ckpt") == 5
    partial = list(ckpts.glob(".*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written file, out of the way
    with pytest.raises(Exception):
        torch.load(partial[0], map_location="cpu", weights_only=False)

    from mdlm_kit.io import load_checkpoint

    model, _ = load_checkpoint(ckpts / "last.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    proc = _fit(tmp_path, "run", corpus, "--ckpt_path", "last", rec=tmp_path / "resumed.rec", capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_records(tmp_path / "resumed.rec") == full[5:]  # resumed from step 5, as if never killed
    assert not list(ckpts.glob(".*.tmp"))  # the dead process's temporary file was cleared


def test_a_run_ending_between_checkpoints_saves_its_last_step(tmp_path, corpus, full, capfd):
    """max_steps 23 with a checkpoint every 5 steps: last.ckpt holds step 23, and resuming it continues exactly."""
    proc = _fit(tmp_path, "run", corpus, end=23, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _step(last) == 23
    proc = _fit(tmp_path, "run", corpus, "--ckpt_path", "last", rec=tmp_path / "rest.rec", capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_records(tmp_path / "run.rec") + read_records(tmp_path / "rest.rec") == full


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus, capfd):
    proc = _fit(tmp_path, "run", corpus, "--trainer.callbacks+=helpers.PoisonAt", "--trainer.callbacks.step", "12",
                capfd=capfd)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    msg = lines[-1]
    assert msg.startswith("mdlm-kit: error: non-finite training loss (nan) at step 12"), msg
    ckpts = tmp_path / "run" / "checkpoints"
    assert f"{ckpts / 'last.ckpt'} (step 10)" in msg and "--on_nonfinite skip" in msg
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=1-step=10.ckpt", "last.ckpt"]
    assert _step(ckpts / "last.ckpt") == 10
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_on_nonfinite_skip_skips_the_step_and_trains_on(tmp_path, corpus, full, where, capfd):
    proc = _fit(tmp_path, "run", corpus, "--on_nonfinite", "skip", "--trainer.callbacks+=helpers.PoisonAt",
                "--trainer.callbacks.step", "12", "--trainer.callbacks.where", where, end=15, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"non-finite (training loss \(nan\)|gradient) at step 12: step skipped", proc.stderr)
    rec = read_records(tmp_path / "run.rec")
    assert rec[:12] == full[:12]
    assert rec[12]["index"] == full[12]["index"]
    if where == "loss":
        assert math.isnan(rec[12]["loss"][0])  # the NaN step ran its backward, as every process must, then no update
    assert rec[12]["wsum"] == rec[11]["wsum"] != full[12]["wsum"]  # no update: the weights stayed as they were
    assert rec[13]["wsum"] != rec[12]["wsum"]  # and training went on
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_steps" in metrics.splitlines()[0]


def test_a_sharded_checkpoint_folder_is_left_to_lightning(tmp_path):
    """FSDP2's default checkpoint is a folder (torch distributed checkpointing's .metadata plus shards): the resume
    check must not call it missing; a folder without that is still refused."""
    from mdlm_kit.errors import UserError
    from mdlm_kit.io.ckpt import check_resume
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.models import Backbone

    model = LanguageModel(vocab_size=11, backbone=Backbone("debug"))
    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / "last.ckpt" / ".metadata").write_bytes(b"")
    check_resume(tmp_path / "last.ckpt", model)
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(UserError, match="no such checkpoint"):
        check_resume(tmp_path / "empty.ckpt", model)
