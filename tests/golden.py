"""The golden losses of configs/debug.yaml: its first training losses on the embedded Shakespeare corpus, on CPU,
with the estimator the recipe trains with (``count``) and with the ``time`` estimator (whose weight w(t) the
recipe's path never computes).

``make golden`` (``python tests/golden.py``) rewrites ``assets/golden_debug_losses.json`` on purpose, after a change
meant to alter training; ``test_golden.py`` compares a fresh run with it (to a relative 1e-6: float32 rounding
differs between CPU instruction sets) and never writes it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from helpers import CONFIGS

ASSET = Path(__file__).resolve().parent / "assets" / "golden_debug_losses.json"
STEPS = 30
# The recipe as configs/debug.yaml has it, cut to STEPS steps: its first validation is at step 50 and the
# sanity check and loggers change no training loss, so they are off to save time.
OVERRIDES = ["--trainer.max_steps", str(STEPS), "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false"]
# CPU results depend on how reductions are split between threads (1 and 2 threads differ at most steps): one
# thread, so the losses depend on the build of torch and the CPU's instruction set (by ~1e-8), not its number of cores
THREADS = 1
ESTIMATORS = ("count", "time")


def debug_losses(workdir: Path, estimator: str = "count") -> list[float]:
    """The float64 per-token loss of each of the first STEPS training steps of the debug recipe, run in process."""
    import torch

    from mdlm_kit.cli import main

    record = workdir / f"losses_{estimator}.jsonl"
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(THREADS)
    sys.argv = ["mdlm-kit"]  # Lightning warns when the process has arguments of its own (pytest's)
    try:
        main(["fit", "--config", str(CONFIGS / "debug.yaml"), *OVERRIDES, "--model.family.estimator", estimator,
              "--trainer.default_root_dir", str(workdir / estimator), "--trainer.callbacks+=helpers.RecordLosses",
              "--trainer.callbacks.path", str(record)])
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    return [r["loss"] for r in rows]


def regenerate() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        losses = {est: debug_losses(Path(tmp), est) for est in ESTIMATORS}
    asset = {"config": "configs/debug.yaml", "overrides": OVERRIDES, "corpus": "shakespeare", "device": "cpu",
             "threads": THREADS, "torch": torch.__version__,
             "loss": "float64 per-token NELBO of each step, per --model.family.estimator", "losses": losses}
    ASSET.write_text(json.dumps(asset, indent=1) + "\n")
    print(f"wrote {STEPS} losses per estimator to {ASSET} (torch {torch.__version__})", file=sys.stderr)


if __name__ == "__main__":
    regenerate()
