"""Hugging Face export and import: bit-exact logits through the Auto classes (the folder's own code, where mdlm-kit
is not importable, and the classes mdlm_kit.io.hf registers) and through ``load_export``, the CLI on an exported
folder, the tokenizer as an AutoTokenizer, and export errors that leave nothing behind."""

import json
import logging
import math
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from helpers import CONFIGS, run_cli, write_corpus
from mdlm_kit import cli
from mdlm_kit.errors import UserError
from mdlm_kit.io import hf, load_checkpoint
from mdlm_kit.io.export import DATA_FACTS, export, hf_tokenizer


@pytest.fixture(scope="module")
def few_step_ckpts(tmp_path_factory, cache_root):
    """A time-conditioned diffusion model and the autoregressive baseline, 5 debug steps each (trained side by
    side: most of a run is start-up)."""
    root = tmp_path_factory.mktemp("hf_train")
    corpus = write_corpus(root / "corpus")
    runs = {
        "conditioned": ["--model.family.time_conditioning", "true"],
        "autoregressive": ["--model.family", "Autoregressive"],
    }

    def fit(name):
        return run_cli("fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
                       "--trainer.max_steps", "5", "--trainer.default_root_dir", str(root / name), *runs[name])

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(runs, pool.map(fit, runs)))
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {name: root / name / "checkpoints" / "last.ckpt" for name in runs}


@pytest.fixture(scope="module")
def ckpts(trained_ckpt, few_step_ckpts):
    return {"agnostic": trained_ckpt, **few_step_ckpts}


@pytest.fixture(scope="module")
def exports(ckpts, tmp_path_factory):
    """Each checkpoint exported once (EMA weights, the default)."""
    root = tmp_path_factory.mktemp("hf_exports")
    out = {}
    for name, ckpt in ckpts.items():
        summary = export(str(ckpt), str(root / name))
        assert summary["out"] == str(root / name) and summary["weights"] == "ema"
        out[name] = root / name
    return out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _from_pretrained(auto, folder):
    """``auto.from_pretrained(folder)`` and every warning transformers logged or raised while loading."""
    import warnings

    handler, logger = _Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = auto.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
    return model, [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]


def _ids(vocab_size: int, batch: int = 3, length: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("name", ["agnostic", "conditioned"])
def test_export_reproduces_the_logits_exactly(name, ckpts, exports):
    model, _ = load_checkpoint(ckpts[name])
    folder = exports[name]
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    conditioned = model.config.time_conditioning
    assert conditioned == (name == "conditioned")
    ids = _ids(model.config.vocab_size)
    cond = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(1)) if conditioned else None
    hf_model, logs = _from_pretrained(AutoModelForMaskedLM, folder)
    exported, _ = hf.load_export(folder)
    assert isinstance(hf_model, hf.MdlmKitForMaskedLM) and not hf_model.training and not exported.training
    with torch.no_grad():
        want = model.backbone(ids, cond)
        got = hf_model(ids, cond=cond).logits
        assert want.dtype == got.dtype == torch.float32
        assert torch.equal(got, want), (got - want).abs().max()
        assert torch.equal(exported.backbone(ids, cond), want)
        assert not torch.equal(want, torch.zeros_like(want))  # the output layer starts at zero: trained, not blind
    assert not logs, logs
    assert exported.family.time_conditioning == conditioned and exported.family.estimator == model.family.estimator


def test_nothing_is_tied_and_a_missing_weight_is_reported(exports, tmp_path):
    """transformers 5 ties through ``_tied_weights_keys`` (a dict) and ``tie_word_embeddings``: neither ties the
    DiT's output layer to its embedding (same shape, different matrices), and loading warns about nothing.
    The negative control shows the log capture would see a missing key."""
    model, logs = _from_pretrained(AutoModelForMaskedLM, exports["agnostic"])
    assert not logs, logs
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == out.shape and emb.data_ptr() != out.data_ptr() and not torch.equal(emb, out)
    assert model.all_tied_weights_keys == {} and model.config.tie_word_embeddings is False

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(exports["agnostic"], broken)
    state = load_file(broken / "model.safetensors")
    del state["backbone.final.linear.bias"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    _, logs = _from_pretrained(AutoModelForMaskedLM, broken)
    assert any("final.linear.bias" in m for m in logs), logs
    with pytest.raises(UserError, match="weights do not fit"):
        hf.load_export(broken)


def test_autoregressive_export_loads_as_a_causal_lm_and_generates_greedily_like_the_model(ckpts, exports):
    model, dm = load_checkpoint(ckpts["autoregressive"])
    hf_model, logs = _from_pretrained(AutoModelForCausalLM, exports["autoregressive"])
    assert isinstance(hf_model, hf.MdlmKitForCausalLM) and not logs, logs
    ids = _ids(model.config.vocab_size)
    start = torch.full((2, 1), model.mask_id)
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, model.backbone(ids))
        got = hf_model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=12, do_sample=False)
        x = start  # greedy decoding of the toolkit's model, the start token (the mask) never predicted
        for _ in range(12):
            logits = model.backbone(x)[:, -1]
            logits[:, model.mask_id] = -torch.inf
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
    eos = dm.tokenizer.eos_id  # generate stops a row at EOS and pads it; compare up to there
    for row_got, row_want in zip(got.tolist(), x.tolist()):
        n = row_want.index(eos) + 1 if eos in row_want[1:] else len(row_want)
        assert row_got[:n] == row_want[:n]
    loaded, _ = hf.load_export(exports["autoregressive"], kind="autoregressive")
    assert type(loaded) is type(model) and loaded.config == model.config  # cond_dim too, which AR takes from its size
    with pytest.raises(UserError, match="needs a masked diffusion model"):
        load_checkpoint(exports["autoregressive"], kind="diffusion")


def test_ema_false_exports_the_weights_before_averaging(trained_ckpt, exports, tmp_path):
    """EMAWeightAveraging saves the average as ``state_dict`` and the trained weights as ``current_model_state``."""
    summary = export(str(trained_ckpt), str(tmp_path / "raw"), ema=False)
    assert summary["weights"] == "raw" and summary["kind"] == "diffusion"
    ckpt = torch.load(trained_ckpt, weights_only=False)
    raw, _ = hf.load_export(tmp_path / "raw")
    ema, _ = hf.load_export(exports["agnostic"])
    trained, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    for k, v in raw.state_dict().items():
        assert torch.equal(v, trained[k]) and torch.equal(ema.state_dict()[k], averaged[k])
    assert not torch.equal(trained["backbone.embed.weight"], averaged["backbone.embed.weight"])



def test_an_export_exports_again_with_the_same_weights_and_facts(exports, tmp_path):
    """export takes what every --checkpoint takes, an export folder too (its one set of weights; --ema false needs
    the .ckpt)."""
    summary = export(str(exports["agnostic"]), str(tmp_path / "again"))
    assert summary["weights"] == "export"
    first, second = hf.load_export(exports["agnostic"])[0], hf.load_export(tmp_path / "again")[0]
    assert first.config == second.config
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    with pytest.raises(UserError, match="--ema false needs the .ckpt"):
        export(str(exports["agnostic"]), str(tmp_path / "raw"), ema=False)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """The ``mdlm-kit`` command in this process: (exit status, stdout, stderr)."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_and_ppl_on_the_export_match_the_checkpoint(ckpts, exports, capsys):
    args = ["--num_samples", "3", "--length", "40", "--seed", "5", "--prompt", "the king"]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda c: run_cli("generate", "--checkpoint", str(c), *args),
                              [ckpts["agnostic"], exports["agnostic"]]))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[json.loads(line) for line in p.stdout.splitlines()] for p in procs]
    assert len(rows[0]) == 3 and rows[0] == rows[1]
    for name in ("agnostic", "conditioned", "autoregressive"):
        results = []
        for where in (ckpts[name], exports[name]):
            code, out, err = _cli(capsys, "ppl", "--checkpoint", str(where), "--max_sequences", "16",
                                  "--progress", "false")
            assert code == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        keys = ("nelbo", "ppl", "stderr", "num_tokens", "data")
        assert {k: results[0][k] for k in keys} == {k: results[1][k] for k in keys}


def test_genppl_scores_with_an_exported_autoregressive_model_as_with_its_checkpoint(ckpts, exports, tmp_path,
                                                                                   capsys):
    samples = tmp_path / "s.jsonl"
    code, _, err = _cli(capsys, "generate", "--checkpoint", str(ckpts["agnostic"]), "--num_samples", "2",
                        "--length", "32", "--seed", "0", "--output", str(samples))
    assert code == 0, err[-2000:]
    scores = []
    for scorer in (ckpts["autoregressive"], exports["autoregressive"]):
        code, out, err = _cli(capsys, "genppl", "--samples", str(samples), "--scorer", str(scorer))
        assert code == 0, err[-2000:]
        scores.append(json.loads(out.strip().splitlines()[-1]))
    assert scores[0]["gen_nll"] == scores[1]["gen_nll"] and math.isfinite(scores[0]["gen_nll"])


# training settings that config.json leaves out: load_export rebuilds the model and data with their defaults
TRAINING_ONLY = {"optimizer", "lr_scheduler", "lr", "weight_decay", "betas", "warmup_steps", "decay_steps",
                 "min_lr_ratio", "unigram_bias", "masked_only", "kernel", "batch_size", "eval_batch_size",
                 "num_workers", "num_proc", "shuffle_seed", "shard_tokens", "shuffle_buffer"}


def _keys(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in _keys(v)}
    return set()


def test_the_export_carries_its_model_data_and_tokenizer_facts_only(ckpts, exports):
    model, dm = load_checkpoint(ckpts["agnostic"])
    exported, dm2 = hf.load_export(exports["agnostic"])
    assert {k: dm2.hparams[k] for k in DATA_FACTS} == {k: dm.hparams[k] for k in DATA_FACTS}
    assert dm.hparams.batch_size == 16 and dm2.hparams.batch_size == 32  # the run's, then the default: not carried
    assert dm2.tokenizer.to_dict() == dm.tokenizer.to_dict()
    assert exported.config == model.config and exported.family.schedule.spec() == model.family.schedule.spec()
    config = json.loads((exports["agnostic"] / "config.json").read_text())
    assert config["model_type"] == "mdlm_kit" and config["kind"] == "diffusion"
    assert config["auto_map"] == {"AutoConfig": "configuration_mdlm_kit.MdlmKitConfig",
                                  "AutoModelForMaskedLM": "modeling_mdlm_kit.MdlmKitForMaskedLM"}
    assert config["dit_config"] == json.loads(json.dumps(model.config.to_dict()))
    assert config["schedule"] == model.family.schedule.spec() and config["num_steps"] is None
    assert config["mask_token_id"] == model.mask_id == config["vocab_size"] - 1
    assert set(config["data"]) == set(DATA_FACTS) and config["data"]["seq_len"] == dm.hparams.seq_len
    config.pop("tokenizer_spec")
    assert not _keys(config) & (TRAINING_ONLY | {"model_hparams", "data_hparams"}), _keys(config) & TRAINING_ONLY
    # AutoTokenizer reads the same folder and gives the toolkit's ids, with the mask token last
    tok = AutoTokenizer.from_pretrained(exports["agnostic"])
    text = "the king spoke softly.\nnow is the winter? Z"
    assert tok(text, add_special_tokens=False).input_ids == dm.tokenizer.encode(text)
    assert tok.decode(dm.tokenizer.encode(text)) == dm.tokenizer.decode(dm.tokenizer.encode(text))
    assert tok.mask_token_id == model.mask_id and len(tok) == model.config.vocab_size


# run where mdlm-kit cannot be imported: the folder's own code (trust_remote_code) computes the logits
REMOTE = """
import sys
sys.modules["mdlm_kit"] = None
try:
    import mdlm_kit
except ImportError:
    pass
else:
    raise SystemExit("mdlm_kit is importable")
import torch, transformers
folder, auto, inputs, out = sys.argv[1:]
model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert not model.training and "mdlm_kit" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
with torch.no_grad():
    torch.save(model(**torch.load(inputs)).logits, out)
"""


@pytest.mark.parametrize("name, auto", [("conditioned", "AutoModelForMaskedLM"),
                                        ("autoregressive", "AutoModelForCausalLM")])
def test_the_folder_loads_with_its_own_code_without_mdlm_kit(name, auto, ckpts, exports, tmp_path):
    import subprocess

    model, _ = load_checkpoint(ckpts[name])
    code = {"configuration_mdlm_kit.py", "modeling_mdlm_kit.py", "config.py", "dit.py"}
    assert code <= set(_listing(exports[name]))
    ids = _ids(model.config.vocab_size)
    inputs = {"input_ids": ids}
    if name == "conditioned":
        inputs["cond"] = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(1))
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules")}
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(exports[name]), auto, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone." not in proc.stderr, proc.stderr[-3000:]  # no missing or unexpected weight reported
    with torch.no_grad():
        want = model.backbone(ids, inputs.get("cond"))
    got = torch.load(tmp_path / "logits.pt")
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), (got - want).abs().max()
    assert not torch.equal(want, torch.zeros_like(want))


def _texts(tmp_path):
    return [p.read_text() for p in sorted(write_corpus(tmp_path / "c", n_docs=3).iterdir())]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "hf"])
def test_every_tokenizer_kind_becomes_an_auto_tokenizer_with_the_same_ids(kind, tmp_path):
    from tokenizers import Tokenizer as Backend

    from mdlm_kit.data.tokenizers import BOS, EOS, Tokenizer, load_gpt2, train_bpe

    if kind == "gpt2":
        tok = load_gpt2()  # the packaged files offline
    else:
        tok = train_bpe(_texts(tmp_path), 300)
        if kind == "hf":  # what a Hugging Face tokenizer by name becomes once loaded: its JSON travels
            tok = Tokenizer(Backend.from_str(tok.tok.to_str()), "hf", BOS, EOS, name="local")
    hf_tokenizer(tok, tok.vocab_size, 256).save_pretrained(tmp_path / "tok")
    auto = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "The king spoke softly,  to the queen.\n\nWhat light? 日本 ok"
    ids = tok.encode(text)
    assert auto(text, add_special_tokens=False).input_ids == ids
    assert auto.decode([tok.bos_id] + ids + [tok.eos_id], skip_special_tokens=True) == tok.decode(ids)
    assert auto.mask_token_id == tok.vocab_size == len(auto) - 1


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _one_error_line(code, err, match):
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mdlm-kit: error: ") and match in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "checkpoint not found"),
        ("corrupt", "not a readable checkpoint"),
        ("no_parent", "does not exist; create it first"),
        ("not_empty", "exists and is not empty; pass --overwrite true"),
        ("folder", "is a folder but not an mdlm-kit export"),
    ],
)
def test_export_errors_are_one_line_and_leave_nothing(case, match, trained_ckpt, tmp_path, capsys):
    ckpt, out = str(trained_ckpt), tmp_path / "out"
    if case == "missing":
        ckpt = str(tmp_path / "none.ckpt")
    elif case == "corrupt":
        (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
        ckpt = str(tmp_path / "bad.ckpt")
    elif case == "no_parent":
        out = tmp_path / "no" / "such" / "out"
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "folder":
        ckpt = str(tmp_path)
    before = _listing(tmp_path)
    code, stdout, err = _cli(capsys, "export", "--checkpoint", ckpt, "--out", str(out))
    _one_error_line(code, err, match)
    assert not stdout and _listing(tmp_path) == before
    if case == "not_empty":
        assert _listing(out) == ["keep.txt"]


def test_overwrite_replaces_only_an_earlier_export(trained, tmp_path, capsys):
    """--overwrite true must not delete a folder that is not an export: e.g. the run folder the checkpoint is in."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _listing(run)
    code, _, err = _cli(capsys, "export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(run),
                        "--overwrite", "true")
    _one_error_line(code, err, "is not an mdlm-kit export")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out",
                        str(tmp_path / "other"), "--overwrite", "true")
    _one_error_line(code, err, "is not an mdlm-kit export")
    assert _listing(run) == before and _listing(tmp_path / "other") == ["notes.txt"]


def test_export_error_from_a_real_process(trained_ckpt, tmp_path):
    proc = run_cli("export", "--checkpoint", str(trained_ckpt), "--out", str(tmp_path / "no" / "out"))
    _one_error_line(proc.returncode, proc.stderr, "does not exist")
    assert _listing(tmp_path) == []


def test_unwritable_parent_is_one_clear_error(trained_ckpt, tmp_path, monkeypatch):
    # root can write anywhere: simulate the check
    monkeypatch.setattr("mdlm_kit.io.export.os.access", lambda *a, **k: False)
    with pytest.raises(UserError, match="permission denied"):
        export(str(trained_ckpt), str(tmp_path / "out"))
    assert _listing(tmp_path) == []


def test_a_failure_mid_write_leaves_no_output_and_keeps_the_old_one(trained_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = hf.MdlmKitForMaskedLM.save_pretrained

    def half_write(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf.MdlmKitForMaskedLM, "save_pretrained", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(trained_ckpt), str(out))
    assert _listing(tmp_path) == []

    monkeypatch.setattr(hf.MdlmKitForMaskedLM, "save_pretrained", real)
    first = export(str(trained_ckpt), str(out))
    weights = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(hf.MdlmKitForMaskedLM, "save_pretrained", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(trained_ckpt), str(out), overwrite=True)
    assert _listing(tmp_path) == ["out"] and _listing(out) == first["files"]
    assert (out / "model.safetensors").read_bytes() == weights

    monkeypatch.setattr(hf.MdlmKitForMaskedLM, "save_pretrained", real)
    (out / "stale.txt").write_text("from before")
    second = export(str(trained_ckpt), str(out), overwrite=True)
    assert _listing(tmp_path) == ["out"] and _listing(out) == second["files"] == first["files"]
    assert (out / "model.safetensors").read_bytes() == weights
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())  # an ordinary folder, not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(UserError, match="is a folder but not an mdlm-kit export \\(no config.json\\)"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="not an mdlm-kit export \\(config.json has model_type 'bert'\\)"):
        load_checkpoint(tmp_path)


def test_importing_the_package_registers_nothing_and_re_import_is_safe():
    code = (
        "import sys, importlib, mdlm_kit\n"
        "assert 'transformers' not in sys.modules and 'mdlm_kit.io.hf' not in sys.modules\n"
        "import mdlm_kit.io.hf as h\n"
        "h = importlib.reload(h)\n"
        "from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForCausalLM\n"
        "c = AutoConfig.for_model('mdlm_kit')\n"
        "assert type(c) is h.MdlmKitConfig\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("layout, conv", [("kit", 0), ("kit", 3), ("mdlm", 0)])
@pytest.mark.parametrize("conditioned", [False, True])
def test_save_and_load_are_exact_for_every_layout(layout, conv, conditioned, tmp_path):
    """Random weights (every parameter non-zero) through save_pretrained / from_pretrained: the rotary tables,
    which the file does not hold, are rebuilt and nothing the file holds is re-initialized."""
    from mdlm_kit.models import DiTConfig

    dit = DiTConfig(vocab_size=11, n_layers=2, d_model=32, n_heads=2, cond_dim=16, max_seq_len=32,
                    time_conditioning=conditioned, layout=layout, conv_kernel=conv)
    model = hf.MdlmKitForMaskedLM(hf.MdlmKitConfig(dit_config=dit.to_dict())).eval()
    torch.manual_seed(3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path)
    loaded, logs = _from_pretrained(AutoModelForMaskedLM, tmp_path)
    assert not logs, logs
    ids, cond = _ids(11, length=32), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(loaded(ids, cond=cond).logits, model(ids, cond=cond).logits)
    assert loaded.config.dit() == dit


def _val_nelbo(root: Path) -> float:
    import csv

    rows = list(csv.DictReader(open(root / "csv" / "version_0" / "metrics.csv")))
    return float(next(r["val/nelbo"] for r in rows if r.get("val/nelbo")))


def test_validate_and_fine_tuning_start_from_an_export(trained, exports, tmp_path, capsys):
    """``--checkpoint`` takes an export into ``validate`` and ``fit``: validation of the export equals validation of
    the checkpoint (both hold the EMA weights), and a fine-tuning run starts from its weights."""
    base = ["--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(trained.parent / "corpus"),
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]
    code, _, err = _cli(capsys, "validate", *base, "--trainer.default_root_dir", str(tmp_path / "a"),
                        "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"))
    assert code == 0, err[-2000:]
    code, _, err = _cli(capsys, "validate", *base, "--trainer.default_root_dir", str(tmp_path / "b"),
                        "--checkpoint", str(exports["agnostic"]))
    assert code == 0, err[-2000:]
    assert _val_nelbo(tmp_path / "a") == _val_nelbo(tmp_path / "b")
    assert _val_nelbo(tmp_path / "b") < 3.0  # a trained model (2.6), not a fresh one (uniform: ln 29 = 3.4)

    # one step at a learning rate of 1e-9 (warmup makes it 1e-10): the trained weights are those of the export
    folder = tmp_path / "export"
    shutil.copytree(exports["agnostic"], folder)
    code, _, err = _cli(capsys, "fit", *base, "--trainer.default_root_dir", str(tmp_path / "c"), "--trainer.max_steps",
                        "1", "--model.optimizer.lr", "1e-9", "--checkpoint", str(folder))
    assert code == 0, err[-2000:]
    tuned = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=False)["current_model_state"]
    source, _ = hf.load_export(folder)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(tuned[k], v, atol=1e-6, rtol=0)
    # resuming the fine-tuning run needs its checkpoint, not the export it started from
    shutil.rmtree(folder)
    code, _, err = _cli(capsys, "fit", *base, "--trainer.default_root_dir", str(tmp_path / "c"), "--trainer.max_steps",
                        "2", "--model.optimizer.lr", "1e-9", "--checkpoint", str(folder), "--ckpt_path", "last")
    assert code == 0, err[-2000:]
    assert torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
