"""The README's bad-input table, row by row: each mistake gives exactly one line on stderr that names the problem
(and the fix), exit status 2, no traceback, and leaves no output behind.

The rows run the ``mdlm-kit`` entry point in this process (``mdlm_kit.cli.main``; tests/test_cli.py runs the
installed command as a subprocess); the table in README.md must list exactly these rows.
"""

import os
import re
from pathlib import Path

import pytest
import torch

from helpers import CONFIGS, ROOT, write_corpus

# id: (argv, what the one line must contain); {names} are the files of the `files` fixture below
ROWS = {
    # fit
    "fit-config-missing": (["fit", "--config", "{tmp}/nope.yaml"], "File does not exist"),
    "fit-corpus-missing": (["fit", "{debug}", "--data.corpus", "{tmp}/nope"], "no such file or folder"),
    "fit-corpus-empty": (["fit", "{debug}", "--data.corpus", "{empty}"], "holds no text (empty corpus)"),
    "fit-corpus-binary": (["fit", "{debug}", "--data.corpus", "{binary}"], "is a binary file (NUL byte at offset 0)"),
    "fit-corpus-not-utf8": (["fit", "{debug}", "--data.corpus", "{latin1}"], "is not valid UTF-8 text (byte 17)"),
    "fit-unknown-key": (["fit", "{debug}", "--config", "{typo}"], "does not accept option 'model.lrr'"),
    "fit-out-of-range": (["fit", "{debug}", "--data.batch_size", "0"], "data.batch_size and data.eval_batch_size must"),
    "fit-dropout-range": (["fit", "{debug}", "--model.backbone.dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    "fit-warmup-negative": (["fit", "{debug}", "--model.lr_scheduler.warmup_steps", "-1"], "warmup_steps must be >= 0"),
    "fit-lr-negative": (["fit", "{debug}", "--model.optimizer.lr", "-1"], "Invalid learning rate: -1.0"),
    "fit-seq-len-above-max": (["fit", "{debug}", "--data.seq_len", "300"], "maximum sequence length 256"),
    "fit-resume-missing": (["fit", "{debug}", "--ckpt_path", "{tmp}/nope.ckpt"], "no such checkpoint"),
    "fit-resume-truncated": (["fit", "{debug}", "--ckpt_path", "{truncated}"], "is truncated or corrupt"),
    "fit-resume-other-vocab": (["fit", "{debug}", "--data.corpus", "{digits}", "--ckpt_path", "{ckpt}"],
                               "was trained with a vocabulary of"),
    "fit-init-from-other-size": (["fit", "{debug}", "--model.backbone.size", "tiny", "--checkpoint", "{ckpt}"],
                                 "holds another architecture"),
    "fit-resume-from-export": (["fit", "{debug}", "--ckpt_path", "{export}"],
                               "start from its weights with --checkpoint"),
    "fit-root-not-writable": (["fit", "{debug}", "--trainer.default_root_dir", "{readonly}/run"],
                              "cannot write in the folder"),
    # generate
    "generate-checkpoint-missing": (["generate", "--checkpoint", "{tmp}/nope.ckpt", "{out}"], "checkpoint not found"),
    "generate-checkpoint-corrupt": (["generate", "--checkpoint", "{latin1}", "{out}"], "not a readable checkpoint"),
    "generate-checkpoint-truncated": (["generate", "--checkpoint", "{truncated}", "{out}"],
                                      "not a readable checkpoint"),
    "generate-prompt-too-long": (["generate", "--checkpoint", "{ckpt}", "--length", "16", "--prompt",
                                  "the king spoke softly to the queen", "{out}"], "longer than --length 16"),
    "generate-length-above-max": (["generate", "--checkpoint", "{ckpt}", "--length", "1000", "{out}"],
                                  "above the model's maximum sequence length 256"),
    "generate-unknown-sampler": (["generate", "--checkpoint", "{ckpt}", "--sampler", "ddim", "{out}"],
                                 "unknown sampler 'ddim'"),
    "generate-output-folder-missing": (["generate", "--checkpoint", "{ckpt}", "--output", "{tmp}/no/x.jsonl"],
                                       "the folder {tmp}/no does not exist"),
    "generate-output-not-writable": (["generate", "--checkpoint", "{ckpt}", "--output", "{readonly}/x.jsonl"],
                                     "cannot write in the folder"),
    # ppl
    "ppl-data-missing": (["ppl", "--checkpoint", "{ckpt}", "--data", "{tmp}/nope.txt"], "no such file or folder"),
    "ppl-data-not-utf8": (["ppl", "--checkpoint", "{ckpt}", "--data", "{latin1}"], "is not valid UTF-8 text"),
    "ppl-seq-len-above-max": (["ppl", "--checkpoint", "{ckpt}", "--seq_len", "1000"], "does not fit the model"),
    "ppl-out-of-range": (["ppl", "--checkpoint", "{ckpt}", "--num_t_samples", "0"], "must be >= 1"),
    "ppl-plot-not-writable": (["ppl", "--checkpoint", "{ckpt}", "--plot", "{readonly}/p.png"],
                              "cannot write in the folder"),
    # data
    "data-config-missing": (["data", "prepare", "--config", "{tmp}/nope.yaml"], "no such file"),
    "data-corpus-binary": (["data", "prepare", "--config", "{recipe}", "--data.corpus", "{binary}"],
                           "is a binary file"),
    "data-unknown-key": (["data", "prepare", "--config", "{recipe}", "--data.seq_lenn", "64"], "seq_lenn"),
    # export
    "export-checkpoint-truncated": (["export", "--checkpoint", "{truncated}", "--out", "{tmp}/exported"],
                                    "not a readable checkpoint"),
    "export-out-folder-missing": (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/no/exported"], "does not exist"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_ckpt):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty.txt").write_text("\n \n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "latin1.txt").write_bytes("the king said caf\u00e9 and left\n".encode("latin-1") * 50)
    (root / "typo.yaml").write_text("model:\n  lrr: 0.1\n")
    digits = root / "digits"
    digits.mkdir()
    (digits / "a.txt").write_text("0123456789\n" * 400)
    (root / "truncated.ckpt").write_bytes(trained_ckpt.read_bytes()[:30000])
    export = root / "export"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "mdlm_kit"}')
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no one can create files in
        readonly = Path("/sys")
    return {"empty": root / "empty.txt", "binary": root / "binary.bin", "latin1": root / "latin1.txt",
            "typo": root / "typo.yaml", "digits": digits, "truncated": root / "truncated.ckpt",
            "readonly": readonly, "ckpt": trained_ckpt, "export": export, "corpus": write_corpus(root / "corpus")}


def _argv(template: list[str], files: dict, tmp: Path) -> list[str]:
    out = []
    for a in template:
        if a == "{debug}":  # the debug recipe on the small corpus, its run folder under tmp
            out += ["--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(files["corpus"]),
                    "--trainer.default_root_dir", str(tmp / "run"), "--trainer.max_steps", "2"]
        elif a == "{out}":
            out += ["--output", str(tmp / "out.jsonl")]
        else:
            out.append(a.format(tmp=tmp, recipe=CONFIGS / "debug.yaml", **files))
    return out


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_row(row, files, tmp_path, capfd, cache_root, monkeypatch):
    from mdlm_kit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["mdlm-kit"])
    template, expected = ROWS[row]
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(template, files, tmp_path))
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err  # one line, nothing before it
    assert lines[0].startswith("mdlm-kit: error: ") and expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no output, no temporary file


def test_the_readme_table_lists_exactly_these_rows():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## When the input is wrong"):]
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(ROWS)


def test_the_corrupt_checkpoint_rows_are_really_broken(files):
    """The truncated checkpoint is a prefix of a good one: torch refuses it (so the rows test what they say)."""
    with pytest.raises(Exception):
        torch.load(files["truncated"], map_location="cpu", weights_only=False)
    assert torch.load(files["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
