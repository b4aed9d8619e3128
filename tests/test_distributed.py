"""Multi-process training on CPU (gloo) and resuming mid-epoch: the same batches, the same losses."""

import json
import os

import numpy as np
import pytest

from helpers import CONFIGS, DDP, ROOT, read_records, run_cli, run_main, write_corpus

pytestmark = pytest.mark.slow

COMMON = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=helpers.RecordBatches"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("dist") / "corpus")


def _fit(tmp, name, corpus, *extra, config=None, capfd=None):
    """The debug recipe with RecordBatches: in this process with ``capfd`` (one process), else in a subprocess (the
    DDP strategies launch their processes by running the command line again)."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config or "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                   "      init_args: {save_last: true, every_n_train_steps: 100}\n")
    args = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--config", str(cfg), "--data.corpus", str(corpus),
            "--trainer.default_root_dir", str(tmp / name), *COMMON, "--trainer.callbacks.path",
            str(tmp / f"{name}.rec"), *extra]
    if capfd is not None:
        proc = run_main(capfd, *args)
    else:
        proc = run_cli(*args, timeout=300, env={"PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _val(tmp, name):
    import csv

    rows = list(csv.DictReader(open(tmp / name / "csv" / "version_0" / "metrics.csv")))
    return [float(r["val/nelbo"]) for r in rows if r.get("val/nelbo")]


FSDP2 = """trainer:
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {data_parallel_size: 2, tensor_parallel_size: 1, save_distributed_checkpoint: false}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 100}
"""


@DDP
def test_two_process_ddp_and_fsdp2_match_one_process_for_the_same_global_batch(tmp_path, corpus, cache_root, capfd):
    steps = ["--trainer.max_steps", "8"]
    _fit(tmp_path, "one", corpus, *steps, "--data.batch_size", "16", capfd=capfd)
    _fit(tmp_path, "ddp", corpus, *steps, "--data.batch_size", "8", "--trainer.devices", "2",
         "--trainer.strategy", "ddp")
    _fit(tmp_path, "fsdp", corpus, *steps, "--data.batch_size", "8", "--trainer.devices", "2", config=FSDP2)
    one = read_records(tmp_path / "one.rec")
    assert [r["step"] for r in one] == list(range(1, 9))
    for name in ("ddp", "fsdp"):
        two = read_records(tmp_path / f"{name}.rec", world_size=2)
        assert [r["step"] for r in two] == [r["step"] for r in one]
        for a, b in zip(one, two):
            # the two ranks' slices make up exactly the one-process batch, in order
            assert b["index"] == a["index"], (name, a["step"])
            # each rank's loss is over its half (equal token counts): their mean is the global batch's loss
            assert abs(np.mean(b["loss"]) - a["loss"][0]) < 2e-5, (name, a["step"], b["loss"], a["loss"])
            assert b["loss"][0] != b["loss"][1]  # the halves differ: the test is not comparing a copy
        assert np.allclose(_val(tmp_path, name), _val(tmp_path, "one"), rtol=0, atol=2e-5), name
    # the one-process run moved: the losses are not constant
    assert one[0]["loss"][0] - one[-1]["loss"][0] > 0.1
    # the FSDP2 run's checkpoint is a full state dict that the other commands read
    proc = run_main(capfd, "ppl", "--checkpoint", str(tmp_path / "fsdp" / "checkpoints" / "last.ckpt"),
                    "--max_sequences", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_sequences"] == 8


@pytest.mark.parametrize("accumulate", [1, 3])
def test_resumed_run_sees_exactly_the_batches_and_losses_of_an_uninterrupted_run(tmp_path, corpus, cache_root, capfd,
                                                                               accumulate):
    """8 batches per epoch; a run stopped mid-epoch and resumed sees the batches and losses of a run never stopped.

    accumulate 1: stopped at step 14 (batch 6 of epoch 1), resumed to step 30. accumulate 3 (an epoch is 3
    optimizer steps, the last over 2 batches): stopped at step 5 (batch 6 of epoch 1), resumed to step 10.
    """
    stop, end = (14, 30) if accumulate == 1 else (5, 10)
    cfg = ("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n"
           "      init_args: {decay: 0.9}\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
           f"      init_args: {{save_last: true, every_n_train_steps: {stop}}}\n")
    args = ["--data.batch_size", "64", "--trainer.val_check_interval", "10",
            "--trainer.accumulate_grad_batches", str(accumulate)]
    _fit(tmp_path, "full", corpus, *args, "--trainer.max_steps", str(end), config=cfg, capfd=capfd)
    _fit(tmp_path, "part", corpus, *args, "--trainer.max_steps", str(stop), config=cfg, capfd=capfd)
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    _fit(tmp_path, "rest", corpus, *args, "--trainer.max_steps", str(end), "--ckpt_path", str(ckpt), config=cfg,
         capfd=capfd)
    full = read_records(tmp_path / "full.rec")
    part, rest = read_records(tmp_path / "part.rec"), read_records(tmp_path / "rest.rec")
    assert (part[-1]["epoch"], part[-1]["batch_idx"]) == (1, 5)  # stopped mid-epoch
    assert part + rest == full  # every batch once, in order, with bit-identical losses (weights, optimizer, EMA)
    assert rest[0]["step"] == stop + (accumulate == 1) and rest[-1]["step"] == end
    epoch2 = [i for r in rest if r["epoch"] == 2 for i in r["index"]]
    assert len(epoch2) == len(set(epoch2)) == 8 * 64  # an epoch is a permutation: nothing repeated


def test_resuming_with_another_global_batch_is_refused(tmp_path, corpus, cache_root, capfd):
    _fit(tmp_path, "a", corpus, "--data.batch_size", "16", "--trainer.max_steps", "3", capfd=capfd)
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                    "--trainer.default_root_dir", str(tmp_path / "b"), "--data.batch_size", "8",
                    "--trainer.max_steps", "6", "--ckpt_path", str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "global batch of 16" in proc.stderr.strip().splitlines()[-1]
    assert os.path.exists(tmp_path / "a" / "checkpoints" / "last.ckpt")


@DDP
def test_ddp_skips_a_step_non_finite_in_one_process_and_saves_together_on_sigterm(tmp_path, corpus, cache_root):
    """2 DDP processes: a NaN loss in process 1 only (step 3) is skipped by both (no update anywhere, no hang,
    no traceback); a SIGTERM to process 0 only (after step 3) makes both save step 3 and stop (status 143)."""
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "8"]
    _fit(tmp_path, "skip", corpus, *ddp, "--trainer.max_steps", "5", "--on_nonfinite", "skip",
         "--trainer.callbacks+=helpers.PoisonAt", "--trainer.callbacks.step", "3", "--trainer.callbacks.rank", "1")
    rec = read_records(tmp_path / "skip.rec", world_size=2)
    assert [r["step"] for r in rec] == [1, 2, 3, 4, 5]
    assert rec[3]["wsum"] == rec[2]["wsum"] != rec[4]["wsum"]  # the 4th step updated nothing, the 5th did

    cfg = tmp_path / "ckpt.yaml"
    cfg.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                   "      init_args: {save_last: true, every_n_train_steps: 100}\n")
    proc = run_cli("fit", "--config", str(CONFIGS / "debug.yaml"), "--config", str(cfg), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(tmp_path / "term"), *COMMON, "--trainer.callbacks.path",
                   str(tmp_path / "term.rec"), *ddp, "--trainer.max_steps", "8", "--trainer.callbacks+=helpers.KillAt",
                   "--trainer.callbacks.step", "3", "--trainer.callbacks.signum", "15", "--trainer.callbacks.rank", "0",
                   timeout=300, env={"PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 143, proc.stderr[-3000:]
    import torch

    assert torch.load(tmp_path / "term" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
