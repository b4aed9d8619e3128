"""Shared helpers for the tests: running the CLI and making corpora."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# Tests that start several DDP processes run one at a time, on one pytest-xdist worker (``make test`` distributes
# with --dist loadgroup): each picks its rendezvous port as a free one and binds it seconds later, and two such runs
# side by side can take each other's ports (the ranks of one then wait for the other's)
DDP = pytest.mark.xdist_group("ddp")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``mdlm-kit ARGS`` in a fresh interpreter. Past ``timeout`` its whole process group is killed (the DDP
    strategies start the other ranks as children that hold the output pipes: killing the command alone would
    leave them, and ``subprocess.run`` waiting on the pipes for ever) and ``TimeoutExpired`` raised."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "mdlm_kit.cli", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_main(capfd, *args: str) -> subprocess.CompletedProcess:
    """``mdlm-kit ARGS`` in this process, as ``run_cli`` reports it (exit status, stdout, stderr), without the
    seconds a fresh interpreter spends importing torch and Lightning. ``capfd`` is the test's fixture."""
    from mdlm_kit.cli import main

    capfd.readouterr()  # what the test printed before is not this command's output
    argv, sys.argv = sys.argv, ["mdlm-kit"]  # the console script's: help names it, Lightning sees no other arguments
    # the log lines a fresh process prints: the toolkit's warnings (logging's last resort there; pytest's log capture
    # holds them here), Lightning's handlers on this test's stderr (not the stream of the test that imported it)
    ours = logging.StreamHandler(sys.stderr)
    ours.setLevel(logging.WARNING)
    logging.getLogger("mdlm_kit").addHandler(ours)
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.setStream(sys.stderr)
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        logging.getLogger("mdlm_kit").removeHandler(ours)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["mdlm-kit", *args], code, out, err)


def write_corpus(folder: Path, n_docs: int = 8, lines: int = 150, seed: int = 0) -> Path:
    """A small corpus with learnable structure: lines drawn from a few fixed sentences, so a masked
    character is predictable from its neighbours far beyond what character frequencies allow."""
    rng = random.Random(seed)
    sentences = [
        "the king spoke softly to the queen.",
        "a fool sang of love and of war.",
        "now is the winter of our discontent.",
        "all the world is a stage.",
        "what light through yonder window breaks?",
        "the rest is silence.",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.txt").write_text("\n".join(rng.choice(sentences) for _ in range(lines)))
    return folder


def random_dit(vocab_size: int, n_layers: int, d_model: int, max_seq_len: int, std: float = 0.5, seed: int = 0):
    """A DiT in eval mode with every parameter drawn from N(0, std^2): predictions depend on the whole
    input (the default init zeroes the output layer, which would make tests blind)."""
    import torch

    from mdlm_kit.models import DiT, DiTConfig

    torch.manual_seed(seed)
    model = DiT(DiTConfig(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=2,
                          max_seq_len=max_seq_len)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def _record_batches_class():
    import json

    from lightning.pytorch.callbacks import Callback

    class RecordBatches(Callback):
        """Appends one JSON line per training step (global step, rank, sample indices, loss, the sum of the
        weights after the step) to ``path``."""

        def __init__(self, path: str):
            self.path = path

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            rec = {"step": trainer.global_step, "rank": trainer.global_rank, "epoch": trainer.current_epoch,
                   "batch_idx": batch_idx, "index": batch["index"].tolist(),
                   "loss": None if loss is None else float(loss),
                   "wsum": sum(float(p.detach().double().sum()) for p in pl_module.parameters())}
            with open(f"{self.path}.{trainer.global_rank}", "a") as f:
                f.write(json.dumps(rec) + "\n")

    return RecordBatches


def _kill_at_class():
    import os
    import signal

    from lightning.pytorch.callbacks import Callback

    class KillAt(Callback):
        """Sends its own process ``signum`` (SIGKILL: nothing runs after it) once training reaches global step
        ``step``: at the end of that training batch, or of the batch ``batch`` of the epoch (gradient
        accumulation), or during the validation that follows it (``during: validation``)."""

        def __init__(self, step: int, signum: int = int(signal.SIGKILL), during: str = "training",
                     batch: int | None = None, rank: int | None = None):
            self.step, self.signum, self.during, self.batch, self.rank = step, signum, during, batch, rank
            self.sent = False

        def _send(self, trainer):
            if not self.sent and (self.rank is None or trainer.global_rank == self.rank):
                self.sent = True
                os.kill(os.getpid(), self.signum)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.during == "training" and trainer.global_step == self.step:
                if self.batch is None or batch_idx == self.batch:
                    self._send(trainer)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if self.during == "validation" and trainer.global_step == self.step and not trainer.sanity_checking:
                self._send(trainer)

    return KillAt


def _kill_during_save_class():
    import io
    import os
    import signal

    import torch
    from lightning.pytorch.callbacks import Callback

    class KillDuringSave(Callback):
        """At global step ``step``, the first checkpoint file written gets half its bytes, then the process
        is SIGKILLed: a crash in the middle of a checkpoint write."""

        def __init__(self, step: int):
            self.step = step

        def setup(self, trainer, pl_module, stage):
            save = torch.save

            def dying_save(obj, f, *args, **kwargs):
                if trainer.global_step == self.step and isinstance(f, (str, os.PathLike)):
                    buf = io.BytesIO()
                    save(obj, buf, *args, **kwargs)
                    with open(f, "wb") as fh:
                        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                        fh.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return save(obj, f, *args, **kwargs)

            torch.save = dying_save

    return KillDuringSave


def _poison_at_class():
    import torch
    from lightning.pytorch.callbacks import Callback

    class PoisonAt(Callback):
        """Makes step ``step`` non-finite: ``where=loss`` puts a NaN into a weight of the first block for that
        step's forward pass (restored right after it), ``where=grad`` an infinity into one gradient before the
        optimizer step; in process ``rank`` only, if given."""

        def __init__(self, step: int, where: str = "loss", rank: int | None = None):
            self.step, self.where, self.saved, self.rank = step, where, None, rank

        def _mine(self, trainer):
            return self.rank is None or trainer.global_rank == self.rank

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.where == "loss" and trainer.global_step == self.step and self._mine(trainer):
                w = pl_module.backbone.blocks[0].mlp.fc.weight
                self.saved = w.detach().clone()
                with torch.no_grad():
                    w[0, 0] = float("nan")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.where == "grad" and trainer.global_step == self.step and self._mine(trainer):
                pl_module.backbone.blocks[0].mlp.fc.weight.grad[0, 0] = float("inf")

        def on_after_backward(self, trainer, pl_module):  # the backward pass needed the poisoned weight
            if self.saved is not None:
                with torch.no_grad():
                    pl_module.backbone.blocks[0].mlp.fc.weight.copy_(self.saved)
                self.saved = None

    return PoisonAt


def _record_losses_class():
    import json

    from lightning.pytorch.callbacks import Callback

    class RecordLosses(Callback):
        """Appends one JSON line per training step to ``path``: the global step and the module's ``last_loss``,
        the float64 per-token loss of which the logged float32 loss is the rounding."""

        def __init__(self, path: str):
            self.path = path

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(pl_module.last_loss)}) + "\n")

    return RecordLosses


_CALLBACKS = {"RecordBatches": _record_batches_class, "KillAt": _kill_at_class,
              "KillDuringSave": _kill_during_save_class, "PoisonAt": _poison_at_class,
              "RecordLosses": _record_losses_class}


def __getattr__(name):  # the callbacks import Lightning only when a CLI run asks for them
    if name in _CALLBACKS:
        return _CALLBACKS[name]()
    raise AttributeError(name)


def read_records(path: Path, world_size: int = 1) -> list[dict]:
    """RecordBatches' lines of all ranks, one per batch in training order (ranks merged: indices concatenated
    in rank order, one loss per rank)."""
    import json

    by_batch: dict[tuple[int, int], dict] = {}
    for r in range(world_size):
        for line in Path(f"{path}.{r}").read_text().splitlines():
            rec = json.loads(line)
            by_batch.setdefault((rec["epoch"], rec["batch_idx"]), {})[rec["rank"]] = rec
    out = []
    for key in sorted(by_batch):
        parts = by_batch[key]
        out.append({"step": parts[0]["step"], "epoch": key[0], "batch_idx": key[1],
                    "index": [i for r in sorted(parts) for i in parts[r]["index"]],
                    "loss": [parts[r]["loss"] for r in sorted(parts)], "wsum": parts[0].get("wsum")})
    return out
