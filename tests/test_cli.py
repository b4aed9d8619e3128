import pytest
import torch

from helpers import CONFIGS, run_cli, run_main, write_corpus


def _one_line_error(proc, match: str):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("mdlm-kit: error: ") and match in last, last
    assert "Traceback" not in proc.stderr


def test_help_lists_the_commands(capfd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the width of a subprocess's help, whatever the terminal running pytest
    proc = run_main(capfd, "--help")
    assert proc.returncode == 0
    for cmd in ("fit", "validate", "generate", "ppl", "genppl", "check-likelihood", "report"):
        assert f"\n  {cmd} " in proc.stdout
    proc = run_main(capfd, "fit", "--help")
    assert proc.returncode == 0
    for option in ("--model.backbone.size", "--model.family FAMILY", "--model.optimizer OPTIMIZER",
                   "--model.lr_scheduler LR_SCHEDULER", "--model.unigram_bias", "--data.corpus", "--on_nonfinite"):
        assert option in proc.stdout, option  # the model's options are on fit's own help, typed
    for family, option in (("MaskedDiffusion", "--model.family.estimator {auto,time,count}"),
                           ("WarmupCosine", "--model.lr_scheduler.warmup_steps")):
        which = "lr_scheduler" if family == "WarmupCosine" else "family"
        proc = run_main(capfd, "fit", f"--model.{which}.help", family)
        assert proc.returncode == 0 and option in proc.stdout, proc.stderr[-2000:]
    for cmd, option in (("ppl", "--num_t_samples"), ("genppl", "--scorer"), ("check-likelihood", "--source")):
        proc = run_main(capfd, cmd, "--help")
        assert proc.returncode == 0 and option in proc.stdout, (cmd, proc.stderr[-2000:])
    # every --checkpoint takes an export folder and an MDLM checkpoint too, and its help says so
    for cmd in ("generate", "ppl", "report", "export"):
        proc = run_main(capfd, cmd, "--help")
        text = " ".join(proc.stdout.split())
        assert proc.returncode == 0 and "a folder written by mdlm-kit export" in text.replace("`", ""), (cmd, text)
        assert "checkpoint of the MDLM reference code" in text, (cmd, text)


def test_print_config_resolves_the_debug_recipe(capfd):
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "size: debug" in proc.stdout and "EMAWeightAveraging" in proc.stdout
    assert "tokenizer: char" in proc.stdout


def test_every_config_parses(capfd):
    for cfg in sorted(CONFIGS.glob("*.yaml")):
        proc = run_main(capfd, "fit", "--config", str(cfg), "--print_config")
        assert proc.returncode == 0, (cfg, proc.stderr[-2000:])
        assert "class_path: mdlm_kit.families." in proc.stdout, cfg  # the family is always named


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data.corpus", "/no/such/corpus"], "no such file or folder: /no/such/corpus"),
        (["--model.family.schedule", "cosin"],
         "model.family.schedule: invalid value 'cosin'; choose one of: LogLinear,"),
        (["--model.family", "Diffusion"], "model.family: invalid value 'Diffusion'; choose one of: MaskedDiffusion, "
                                          "Autoregressive"),
        (["--data.seq_len", "300"], "above the model's maximum sequence length 256"),
        (["--model.no_such_option", "3"], "no_such_option"),
        (["--data.tokenizer", "words"], "data.tokenizer 'words' is not one of char, bpe, gpt2"),
        (["--model.backbone.size", "huge"],
         "model.backbone.size: Expected a typing.Literal['debug', 'tiny', 'small', 'medium']. Got value: huge"),
    ],
    ids=["missing-path", "unknown-schedule", "unknown-family", "seq-len-above-max", "unknown-key", "unknown-tokenizer",
         "unknown-size"],
)
def test_fit_bad_input_gives_one_line_and_leaves_nothing(tmp_path, corpus, cache_root, capfd, args, match):
    out = tmp_path / "run"
    argv = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus)]
    proc = run_main(capfd, *argv, "--trainer.default_root_dir", str(out), *args)
    _one_line_error(proc, match)
    assert not (out / "checkpoints").exists()


def test_fit_on_an_empty_corpus(tmp_path, cache_root, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n")
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(tmp_path / "empty"),
                    "--trainer.default_root_dir", str(tmp_path / "run"))
    _one_line_error(proc, "empty corpus")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_command():
    # a real process: the exit status and the one line are what a shell sees
    _one_line_error(run_cli("trian"), "unknown command 'trian'")


def test_report_on_missing_and_corrupt_checkpoints(tmp_path, capfd):
    _one_line_error(run_main(capfd, "report", "--checkpoint", str(tmp_path / "nope.ckpt")), "checkpoint not found")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    _one_line_error(run_main(capfd, "report", "--checkpoint", str(bad)), "not a readable checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": 1}, other)
    _one_line_error(run_main(capfd, "report", "--checkpoint", str(other)), "not an mdlm-kit checkpoint")
