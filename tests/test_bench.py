"""The benchmark scripts run end to end (at tiny shapes, on CPU) and print the ratios they promise."""

import json
import os
import subprocess

from helpers import ROOT


def test_gpu_script_runs_its_steps_at_smoke_scale(tmp_path):
    env = {**os.environ, "SCALE": "smoke", "OUT": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed" not in proc.stdout, proc.stdout[-3000:]
    assert "passed" in (tmp_path / "kernel_tests.log").read_text()
    train = json.loads((tmp_path / "train.json").read_text())
    for key in ("train_speedup_vs_reference", "train_peak_mem_ratio_vs_reference", "mfu_cpu"):
        assert train[key] > 0, key
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["ppl_speedup_vs_reference"] > 0
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["weighted_ce_reference_gb_per_s"] > 0 and kernels["masked_categorical_reference_gb_per_s"] > 0
