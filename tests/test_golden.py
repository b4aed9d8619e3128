"""The debug recipe's first training losses, bit for bit, with the count estimator (the recipe's) and the time
estimator: a change to anything its training computes (either estimator's weights, the schedule's eps, the model,
the data order, the optimizer) shows here. After a change meant to alter training, ``make golden`` rewrites the
asset."""

import json

import pytest
import torch
from golden import ASSET, ESTIMATORS, OVERRIDES, THREADS, debug_losses


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_debug_recipe_reproduces_its_golden_losses(tmp_path, cache_root, estimator):
    golden = json.loads(ASSET.read_text())
    assert (golden["overrides"], golden["threads"]) == (OVERRIDES, THREADS), "the run changed: make golden"
    want = golden["losses"][estimator]
    losses = debug_losses(tmp_path, estimator)
    assert len(losses) == len(want)
    differ = [(step, got, w) for step, (got, w) in enumerate(zip(losses, want), 1) if got != w]
    assert not differ, (
        f"{len(differ)} of {len(losses)} losses differ from {ASSET.name} (made with torch {golden['torch']}, this is "
        f"{torch.__version__}); (step, got, golden): {differ[:3]}; if the change is meant, run `make golden`")
