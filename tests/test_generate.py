import json

import pytest
import torch

from helpers import run_main
from mdlm_kit.generate import generate_samples
from mdlm_kit.io import load_checkpoint


def test_generate_writes_jsonl_with_text_and_tokens_and_keeps_the_prompt(trained_ckpt, tmp_path, capfd):
    out = tmp_path / "s.jsonl"
    proc = run_main(capfd, "generate", "--checkpoint", str(trained_ckpt), "--sampler", "fhs", "--num_samples", "3",
                    "--length", "48", "--seed", "7", "--prompt", "the king", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    model, dm = load_checkpoint(trained_ckpt)
    prompt_ids = [dm.tokenizer.bos_id] + dm.tokenizer.encode("the king")
    for r in rows:
        assert len(r["tokens"]) == 48 and r["tokens"][: len(prompt_ids)] == prompt_ids
        assert r["text"].startswith("the king")
        assert model.mask_id not in r["tokens"]
    # stdout when no --output, and the same samples for the same seed
    proc = run_main(capfd, "generate", "--checkpoint", str(trained_ckpt), "--num_samples", "3", "--length", "48",
                    "--seed", "7", "--prompt", "the king")
    assert [json.loads(line)["tokens"] for line in proc.stdout.splitlines()] == [r["tokens"] for r in rows]


def test_samples_do_not_depend_on_the_batch_size(trained_ckpt):
    model, dm = load_checkpoint(trained_ckpt)
    for sampler in ("fhs", "ancestral_cache"):
        a = generate_samples(model, dm.tokenizer, sampler, num_samples=4, length=32, seed=1, steps=100, batch_size=4)
        b = generate_samples(model, dm.tokenizer, sampler, num_samples=4, length=32, seed=1, steps=100, batch_size=1)
        assert [s["tokens"] for s in a] == [s["tokens"] for s in b]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sampler", "ddim"], "unknown sampler 'ddim'"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--top_p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "the king spoke softly to the queen " * 4, "--length", "16"], "longer than --length 16"),
        (["--length", "100000"], "above the model's maximum sequence length"),
    ],
)
def test_generate_bad_input(trained_ckpt, tmp_path, capfd, args, match):
    out = tmp_path / "out.jsonl"
    proc = run_main(capfd, "generate", "--checkpoint", str(trained_ckpt), "--output", str(out), *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mdlm-kit: error: ")
    assert match in proc.stderr.strip().splitlines()[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_generate_missing_checkpoint_and_output_folder(tmp_path, trained_ckpt, capfd):
    proc = run_main(capfd, "generate", "--checkpoint", str(tmp_path / "none.ckpt"))
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    proc = run_main(capfd, "generate", "--checkpoint", str(trained_ckpt), "--output", str(tmp_path / "no" / "x.jsonl"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_report_adds_samples(trained_ckpt, capfd):
    proc = run_main(capfd, "report", "--checkpoint", str(trained_ckpt), "--num_samples", "2", "--sample_length", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rep["samples"]) == 2 and all(isinstance(s, str) and s for s in rep["samples"])
    assert torch.isfinite(torch.tensor(rep["val_nelbo"]))
