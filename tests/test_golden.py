"""The debug recipe's first training losses, bit for bit: a change to anything its training computes (the count
estimator's weights, the schedule's eps, the model, the data order, the optimizer) shows here. The time estimator's
weight w(t) is not on this path. After a change meant to alter training, ``make golden`` rewrites the asset."""

import json

import torch
from golden import ASSET, OVERRIDES, THREADS, debug_losses


def test_debug_recipe_reproduces_its_golden_losses(tmp_path, cache_root):
    golden = json.loads(ASSET.read_text())
    assert (golden["overrides"], golden["threads"]) == (OVERRIDES, THREADS), "the run changed: make golden"
    losses = debug_losses(tmp_path)
    assert len(losses) == len(golden["losses"])
    differ = [(step, got, want) for step, (got, want) in enumerate(zip(losses, golden["losses"]), 1) if got != want]
    assert not differ, (
        f"{len(differ)} of {len(losses)} losses differ from {ASSET.name} (made with torch {golden['torch']}, this is "
        f"{torch.__version__}); (step, got, golden): {differ[:3]}; if the change is meant, run `make golden`")
