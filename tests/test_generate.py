import json

import pytest
import torch

from helpers import run_main
from mdlm_kit.generate import generate_samples
from mdlm_kit.io import load_checkpoint
from mdlm_kit.sampling import Ancestral, AncestralCache, FirstHitting


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
    for sampler in (FirstHitting(), AncestralCache(steps=100)):
        a = generate_samples(model, dm.tokenizer, sampler, num_samples=4, length=32, seed=1, batch_size=4)
        b = generate_samples(model, dm.tokenizer, sampler, num_samples=4, length=32, seed=1, batch_size=1)
        assert [s["tokens"] for s in a] == [s["tokens"] for s in b]


def test_sampler_options_reach_the_sampler(trained_ckpt, capfd):
    """``--sampler NAME --sampler.OPTION``: the command's samples are the Python API's with the same typed sampler,
    and the option is not ignored (the defaults give other samples)."""
    model, dm = load_checkpoint(trained_ckpt)

    def tokens(sampler):
        return [s["tokens"] for s in generate_samples(model, dm.tokenizer, sampler, num_samples=2, length=24, seed=3)]

    for args, sampler, default in ((["--sampler", "ancestral", "--sampler.steps", "20"], Ancestral(steps=20),
                                    Ancestral()),
                                   (["--sampler.temperature", "0.5"], FirstHitting(temperature=0.5), FirstHitting())):
        proc = run_main(capfd, "generate", "--checkpoint", str(trained_ckpt), "--num_samples", "2", "--length", "24",
                        "--seed", "3", *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = [json.loads(line)["tokens"] for line in proc.stdout.splitlines()]
        assert got == tokens(sampler) != tokens(default), args


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sampler", "ddim"], "unknown sampler 'ddim'"),
        (["--sampler", "ancestral", "--sampler.steps", "0"], "steps must be >= 1"),
        (["--sampler.temperature", "0"], "temperature must be > 0"),
        (["--sampler", "FirstHitting", "--sampler.top_p", "1.5"], "top_p must be in (0, 1]"),
        # an option the chosen sampler does not have is refused, naming it and the sampler
        (["--sampler", "ancestral", "--sampler.tokens_per_step", "2"],
         "sampler: Option 'tokens_per_step' is not accepted (by Ancestral)"),
        (["--steps", "100"], "unrecognized arguments: --steps"),
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
