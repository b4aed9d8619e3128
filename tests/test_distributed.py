"""Multi-process training on CPU (gloo) and resuming mid-epoch: the same batches, the same losses."""

import json
import os

import numpy as np
import pytest

from helpers import CONFIGS, ROOT, read_records, run_cli, write_corpus

pytestmark = pytest.mark.slow

COMMON = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=helpers.RecordBatches"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("dist") / "corpus")


def _fit(tmp, name, corpus, *extra, config=None):
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config or "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                   "      init_args: {save_last: true, every_n_train_steps: 100}\n")
    proc = run_cli("fit", "--config", str(CONFIGS / "debug.yaml"), "--config", str(cfg), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(tmp / name), *COMMON, "--trainer.callbacks.path",
                   str(tmp / f"{name}.rec"), *extra, timeout=300, env={"PYTHONPATH": str(ROOT / "tests")})
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


def test_two_process_ddp_and_fsdp2_match_one_process_for_the_same_global_batch(tmp_path, corpus, cache_root):
    steps = ["--trainer.max_steps", "8"]
    _fit(tmp_path, "one", corpus, *steps, "--data.batch_size", "16")
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
    proc = run_cli("ppl", "--checkpoint", str(tmp_path / "fsdp" / "checkpoints" / "last.ckpt"), "--max_sequences", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_sequences"] == 8


def test_resumed_run_sees_exactly_the_batches_and_losses_of_an_uninterrupted_run(tmp_path, corpus, cache_root):
    """8 batches per epoch; stopped at step 14 (mid-epoch 2), resumed to 30: steps 15..30 are identical."""
    cfg = ("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n"
           "      init_args: {decay: 0.9}\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
           "      init_args: {save_last: true, every_n_train_steps: 7}\n")
    args = ["--data.batch_size", "64", "--trainer.val_check_interval", "10"]
    _fit(tmp_path, "full", corpus, *args, "--trainer.max_steps", "30", config=cfg)
    _fit(tmp_path, "part", corpus, *args, "--trainer.max_steps", "14", config=cfg)
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    _fit(tmp_path, "rest", corpus, *args, "--trainer.max_steps", "30", "--ckpt_path", str(ckpt), config=cfg)
    full = {r["step"]: r for r in read_records(tmp_path / "full.rec")}
    rest = read_records(tmp_path / "rest.rec")
    assert [r["step"] for r in rest] == list(range(15, 31))
    assert {r["epoch"] for r in rest} == {1, 2, 3}  # the rest of epoch 1, then whole epochs
    for r in rest:
        assert r["index"] == full[r["step"]]["index"], r["step"]
        assert r["loss"] == full[r["step"]]["loss"], r["step"]  # bit for bit: weights, optimizer, EMA, data
    # and an epoch is a permutation of the blocks: no sample repeated or skipped
    epoch2 = [i for r in rest if r["epoch"] == 2 for i in r["index"]]
    assert len(epoch2) == len(set(epoch2)) == 8 * 64


def test_resuming_with_another_global_batch_is_refused(tmp_path, corpus, cache_root):
    _fit(tmp_path, "a", corpus, "--data.batch_size", "16", "--trainer.max_steps", "3")
    proc = run_cli("fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                   "--trainer.default_root_dir", str(tmp_path / "b"), "--data.batch_size", "8",
                   "--trainer.max_steps", "6", "--ckpt_path", str(tmp_path / "a" / "checkpoints" / "last.ckpt"),
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "global batch of 16" in proc.stderr.strip().splitlines()[-1]
    assert os.path.exists(tmp_path / "a" / "checkpoints" / "last.ckpt")
