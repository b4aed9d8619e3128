"""Hugging Face export and import: a trained checkpoint as a ``transformers`` model folder, and back.

``mdlm-kit export --checkpoint CKPT --out DIR`` (``export``) writes DIR with

- ``config.json``: an ``MdlmKitConfig`` (``model_type: mdlm_kit``): the DiT's config, the model kind, the
  LightningModule's hyperparameters, the data module's hyperparameters and the tokenizer's dict, so the
  folder alone rebuilds the model, its data and its tokenizer offline;
- ``model.safetensors``: the backbone's float weights under the LightningModule's names (``backbone.*``);
- ``tokenizer.json``, ``tokenizer_config.json``: the tokenizer as a ``PreTrainedTokenizerFast`` with the mask
  token added as the last id, for ``AutoTokenizer.from_pretrained(DIR)``;
- ``generation_config.json``: for the autoregressive kind.

After ``import mdlm_kit.hf`` (which registers the classes with the Auto classes), a diffusion export loads with
``AutoModelForMaskedLM.from_pretrained(DIR)`` and an autoregressive one with ``AutoModelForCausalLM``.
``load_export`` (and so every ``--checkpoint`` of the ``mdlm-kit`` command) reads the folder back into the
toolkit's LightningModule and data module; it reads config.json and the safetensors itself and never needs
the written tokenizer files (the tokenizer dict in the config is the one the toolkit decodes with).
An export is for inference and evaluation: the optimizer state and the data position stay in the ``.ckpt``
(resume training from that).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput
from transformers.utils import logging as hf_logging

from mdlm_kit.checkpoint import EXPORT_MODEL_TYPE, is_export
from mdlm_kit.errors import UserError
from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.models.dit import Rotary
from mdlm_kit.utils import current_umask

MODEL_TYPE = EXPORT_MODEL_TYPE
MASK_TOKEN = "<|mdlm_mask|>"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class MdlmKitConfig(PretrainedConfig):
    """What rebuilds an mdlm-kit model: its DiT, its kind, and the training run's model and data settings.

    Args:
        kind: ``diffusion`` (bidirectional, ``MdlmKitForMaskedLM``) or ``autoregressive`` (causal,
            ``MdlmKitForCausalLM``).
        dit_config: the fields of ``mdlm_kit.models.DiTConfig``.
        model_hparams: the LightningModule's constructor arguments (schedule, schedule_kwargs, num_steps,
            estimator, seed, time_conditioning, layout, ...), as ``save_hyperparameters`` recorded them.
        data_hparams: the ``TextDataModule``'s constructor arguments (corpus, seq_len, packing, ...).
        tokenizer_spec: the tokenizer's ``to_dict()`` (``mdlm_kit.data.tokenizers.tokenizer_from_dict``).
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings, mask_token_id:
            mirrors of ``dit_config`` under Hugging Face's names, for tools that read them; the model reads
            ``dit_config``.
    """

    model_type = MODEL_TYPE

    kind: str = "diffusion"
    dit_config: dict | None = None
    model_hparams: dict | None = None
    data_hparams: dict | None = None
    tokenizer_spec: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # the output layer is its own matrix (MDLM's DiT): nothing is tied, on save or on load
    tie_word_embeddings: bool = False
    use_cache: bool = False  # the DiT keeps no key/value cache: generate() recomputes the prefix

    def __post_init__(self, **kwargs):
        if self.kind not in ("diffusion", "autoregressive"):
            raise ValueError(f"kind must be diffusion or autoregressive, got {self.kind!r}")
        if self.dit_config is not None:
            dit = self.dit()
            self.vocab_size, self.hidden_size = dit.vocab_size, dit.d_model
            self.num_hidden_layers, self.num_attention_heads = dit.n_layers, dit.n_heads
            self.max_position_embeddings, self.mask_token_id = dit.max_seq_len, dit.mask_id
        super().__post_init__(**kwargs)

    def dit(self) -> DiTConfig:
        return DiTConfig(**self.dit_config)


class MdlmKitPreTrainedModel(PreTrainedModel):
    """The DiT under ``backbone``, with the same parameter names as the LightningModule's state_dict."""

    config_class = MdlmKitConfig
    config: MdlmKitConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # transformers 5 reads a {target: source} dict; empty, with tie_word_embeddings=False, so nothing is tied
    _tied_weights_keys: dict[str, str] = {}
    causal = False

    def __init__(self, config: MdlmKitConfig):
        super().__init__(config)
        self.backbone = DiT(config.dit(), causal=self.causal)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.backbone.final.linear

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The DiT's own initialization (``DiT.reset_parameters``: PyTorch defaults, output layer and adaLN at
        zero), not transformers' generic normal(0.02).

        ``from_pretrained`` runs this after loading: under transformers' guard, the init functions skip every
        tensor it loaded (flag ``_is_hf_initialized``), so loaded weights stay bit-exact and only what the
        file lacks is initialized, among them the rotary tables (non-persistent buffers, left empty by the
        meta-device construction).
        """
        with hf_init.guard_torch_init_functions():
            self.backbone.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, Rotary):
                self._init_weights(module)
            elif buffers := sorted(module._non_persistent_buffers_set):  # would load as uninitialized memory
                raise NotImplementedError(f"{name} has non-persistent buffers {buffers}; recompute them in "
                                          "MdlmKitPreTrainedModel._init_weights")

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Rotary):
            head_dim, max_len = module.cos.shape[-1], module.cos.shape[0]
            with torch.device("cpu"):  # from_pretrained builds under a meta-device context
                fresh = Rotary(head_dim, max_len, self.config.dit().rope_base)
            hf_init.copy_(module.cos, fresh.cos.to(module.cos.device))
            hf_init.copy_(module.sin, fresh.sin.to(module.sin.device))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()  # PyTorch's default, as DiT.reset_parameters (e.g. a resized embedding)


class MdlmKitForMaskedLM(MdlmKitPreTrainedModel):
    """A masked diffusion model: ``forward(input_ids, cond=...) -> MaskedLMOutput(logits)``.

    ``logits`` (B, S, vocab_size) are the DiT's raw scores, the mask token's column (the last id) included;
    the toolkit's objective and samplers never predict the mask (SUBS: its logit is -inf) and carry
    unmasked tokens over.
    """

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cond: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple[Tensor]:
        """Args:
            input_ids: (B, S) token ids, the mask id (``config.mask_token_id``) where a token is masked.
            attention_mask: accepted and ignored: the model attends to every position, as in training
                (padding is a token it saw there, left out only of the loss).
            cond: (B,) mask rate 1 - alpha(t) of each sequence; required by time-conditioned models
                (``model_hparams.time_conditioning``), ignored by time-agnostic ones.
        """
        logits = self.backbone(input_ids, cond)  # (B, S, V)
        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=logits)


class MdlmKitForCausalLM(MdlmKitPreTrainedModel, GenerationMixin):
    """The autoregressive baseline: ``forward(input_ids) -> CausalLMOutput(logits)``, position l predicting l+1.

    Sequences start with the start token, which is the mask id (``config.bos_token_id``); the model never
    predicts it (``generation_config.suppress_tokens``). No key/value cache: ``generate`` recomputes the prefix.
    """

    causal = True

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput | tuple[Tensor]:
        """Args:
            input_ids: (B, S) token ids, the first being the start token (the mask id).
            attention_mask: accepted and ignored (causal attention over every position; pad on the right).
        """
        logits = self.backbone(input_ids, None)  # (B, S, V)
        if return_dict is False:
            return (logits,)
        return CausalLMOutput(logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}


AUTO_CLASSES = {"diffusion": (AutoModelForMaskedLM, MdlmKitForMaskedLM),
                "autoregressive": (AutoModelForCausalLM, MdlmKitForCausalLM)}

# exist_ok: a second import (importlib.reload, a notebook re-running cells) re-registers instead of failing
AutoConfig.register(MODEL_TYPE, MdlmKitConfig, exist_ok=True)
for _auto, _cls in AUTO_CLASSES.values():
    _auto.register(MdlmKitConfig, _cls, exist_ok=True)


# ---- the tokenizer as a Hugging Face tokenizer ----


def hf_tokenizer(tok, mask_id: int, max_len: int | None = None) -> PreTrainedTokenizerFast:
    """``tok`` (any of the toolkit's tokenizers) as a ``PreTrainedTokenizerFast`` that encodes and decodes the
    same ids, with the model's mask token added as id ``mask_id`` (the last one).

    ``char`` becomes a BPE without merges over its characters (every character one token, unknown ones
    ``<unk>``); ``bpe``, ``gpt2`` and Hugging Face tokenizers are already ``tokenizers.Tokenizer``s. As in
    any Hugging Face tokenizer, the special tokens' text (``<bos>``, ``<eos>``, the mask) typed in the input
    encodes to their ids, where the toolkit's char tokenizer spells it out. Raises ``ValueError`` where the
    vocabulary does not end right before ``mask_id``.
    """
    from tokenizers import Tokenizer as _T
    from tokenizers import decoders, models

    from mdlm_kit.data.tokenizers import UNK, CharTokenizer

    kwargs = {}
    if isinstance(tok, CharTokenizer):
        backend = _T(models.BPE(vocab={s: i for i, s in enumerate(tok.itos)}, merges=[], unk_token=UNK))
        backend.decoder = decoders.Sequence([decoders.Replace(UNK, "\ufffd"), decoders.Fuse()])  # as decode()
        bos, eos, pad, kwargs["unk_token"] = tok.itos[tok.bos_id], tok.itos[tok.eos_id], None, UNK
    else:
        backend = _T.from_str(tok.tok.to_str())  # a copy: adding the mask must not touch the toolkit's tokenizer
        bos, eos, pad = tok.bos, tok.eos, getattr(tok, "pad", None)
    if backend.token_to_id(MASK_TOKEN) is not None or backend.get_vocab_size(with_added_tokens=True) != mask_id:
        raise ValueError(f"the tokenizer's vocabulary ({backend.get_vocab_size(with_added_tokens=True)} ids) does "
                         f"not end right before the model's mask id {mask_id}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad or eos, mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False, model_max_length=max_len or int(1e30), **kwargs,
    )
    if fast.mask_token_id != mask_id:
        raise ValueError(f"the mask token went to id {fast.mask_token_id}, not the model's mask id {mask_id}")
    return fast


# ---- export ----


def _jsonable(d: dict, what: str) -> dict:
    """``d`` as it will read back from config.json (tuples become lists); a clear error for what JSON cannot hold."""
    try:
        return json.loads(json.dumps(dict(d)))
    except (TypeError, ValueError) as e:
        raise UserError(f"the checkpoint's {what} cannot be written as JSON ({e})") from None


def _checkpoint_weights(path: Path, model, ema: bool) -> str:
    """Load the weights to export into ``model``; return which they are (``ema`` or ``raw``).

    Lightning's weight averaging (``EMAWeightAveraging``) saves the averaged weights as ``state_dict``, the
    ones every mdlm-kit command uses, and the trained ones as ``current_model_state``.
    """
    try:  # memory-mapped: the second read of a large checkpoint costs little
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    averaged = "current_model_state" in ckpt
    averaging = averaged or any("WeightAveraging" in str(k) for k in ckpt.get("callbacks", {}))
    if ema:
        return "ema" if averaging else "raw"
    if averaged:
        model.load_state_dict(ckpt["current_model_state"])
        return "raw"
    if averaging:
        raise UserError(f"{path} holds only the averaged weights (saved after training); export them with --ema true")
    return "raw"


def _check_out(out: Path, overwrite: bool) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {parent} (permission denied); choose a folder you can write")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty; pass --overwrite true to replace it, or choose "
                            "another folder")
        if not is_export(out):  # --overwrite replaces an earlier export, never a folder of something else
            raise UserError(f"--out {out} exists and is not an mdlm-kit export; --overwrite only replaces an "
                            "earlier export: choose another folder")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is renamed away first, restored if
    the second rename fails, and deleted last, so ``out`` is always either the old folder or the new one."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "x")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "x", out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_hf_model(model, dm) -> MdlmKitPreTrainedModel:
    """The Hugging Face model of a loaded LightningModule (``load_checkpoint``'s pair), weights copied bit-exactly."""
    if dm.tokenizer is None:
        raise UserError("the checkpoint holds no tokenizer; it was not written by mdlm-kit fit")
    config = MdlmKitConfig(
        kind=model.kind,
        dit_config=_jsonable(model.config.to_dict(), "model config"),
        model_hparams=_jsonable(model.hparams, "model hyperparameters"),
        data_hparams=_jsonable(dm.hparams, "data hyperparameters"),
        tokenizer_spec=_jsonable(dm.tokenizer.to_dict(), "tokenizer"),
        eos_token_id=dm.tokenizer.eos_id,
        pad_token_id=dm.tokenizer.pad_id,
        bos_token_id=model.mask_id if model.kind == "autoregressive" else dm.tokenizer.bos_id,
    )
    _, cls = AUTO_CLASSES[model.kind]
    hf = cls(config)
    hf.backbone.load_state_dict(model.backbone.state_dict())
    if model.kind == "autoregressive":
        g = hf.generation_config
        g.bos_token_id, g.eos_token_id, g.pad_token_id = model.mask_id, dm.tokenizer.eos_id, dm.tokenizer.pad_id
        g.suppress_tokens, g.use_cache = [model.mask_id], False
    return hf.eval()


def export(checkpoint: str, out: str, ema: bool = True, overwrite: bool = False) -> dict:
    """Write a checkpoint as a Hugging Face model folder: model.safetensors, config.json and the tokenizer.

    The folder loads with ``AutoModelForMaskedLM.from_pretrained(out)`` (``AutoModelForCausalLM`` for the
    autoregressive baseline) after ``import mdlm_kit.hf``, with ``AutoTokenizer.from_pretrained(out)``, and
    wherever the mdlm-kit command takes ``--checkpoint``. It is written to a temporary folder beside ``out``
    and renamed into place: ``out`` is never left half-written.

    Args:
        checkpoint: a ``.ckpt`` written by ``mdlm-kit fit``, a folder written by ``mdlm-kit export``,
            or a checkpoint of the MDLM reference code.
        out: the folder to write (its parent must exist).
        ema: the EMA weights of a run trained with ``EMAWeightAveraging`` (the checkpoint's ``state_dict``,
            the weights every mdlm-kit command uses); ``false``: the trained weights Lightning saved beside
            them (``current_model_state``). Without EMA, both are the trained weights.
        overwrite: replace an existing non-empty ``out``.

    Returns:
        ``out``, the ``files`` written, ``num_parameters``, ``vocab_size`` (with the mask), ``kind``,
        ``weights`` (``ema`` or ``raw``) and ``auto_tokenizer`` (whether the tokenizer files were written).
    """
    from mdlm_kit.checkpoint import load_checkpoint

    out_path = Path(out).expanduser().absolute()
    _check_out(out_path, overwrite)
    from mdlm_kit.models.mdlm_import import is_mdlm_checkpoint, load_mdlm_checkpoint

    ckpt_path = Path(checkpoint)
    if ckpt_path.expanduser().absolute().is_relative_to(out_path):
        raise UserError(f"--checkpoint {ckpt_path} lies inside --out {out_path}; export to another folder")
    if is_mdlm_checkpoint(ckpt_path):  # the MDLM reference code's: its EMA weights unless ema is false
        model, dm = load_mdlm_checkpoint(ckpt_path, use_ema=ema)
        weights = model.imported_weights
    else:
        if ckpt_path.is_dir():
            raise UserError(f"{ckpt_path} is a folder; export takes a .ckpt written by mdlm-kit fit")
        model, dm = load_checkpoint(ckpt_path)
        weights = _checkpoint_weights(ckpt_path, model, ema)
    hf = build_hf_model(model, dm)
    try:
        tokenizer, tokenizer_note = hf_tokenizer(dm.tokenizer, model.mask_id, model.config.max_seq_len), None
    except ValueError as e:  # the toolkit loads the export without it (config.json's tokenizer_spec)
        tokenizer, tokenizer_note = None, f"no AutoTokenizer files: {e}"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    except PermissionError:
        raise UserError(f"--out {out_path}: cannot write in {out_path.parent} (permission denied)") from None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command prints one JSON object; a one-shard progress bar is noise
    try:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        if WEIGHTS not in files and WEIGHTS_INDEX not in files:
            raise RuntimeError(f"save_pretrained wrote no safetensors weights (files: {files})")
        # mkdtemp's folder and the weights written through a temporary file are private (0700/0600): make the
        # export an ordinary folder, readable as the user's umask says
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        _move_into_place(tmp, out_path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "out": str(out_path),
        "files": files,
        "num_parameters": hf.backbone.num_parameters(),
        "vocab_size": model.config.vocab_size,
        "kind": model.kind,
        "weights": weights,
        "auto_tokenizer": tokenizer is not None,
    }
    if tokenizer_note:
        summary["note"] = tokenizer_note
    return summary


# ---- import ----


def _read_weights(folder: Path, device: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = folder / WEIGHTS_INDEX
    if index.is_file():  # sharded: save_pretrained splits files above max_shard_size
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        raise UserError(f"{folder} has no {WEIGHTS}; the export is incomplete")
    state = {}
    for name in shards:
        try:
            state.update(load_file(folder / name, device=device))
        except Exception as e:
            raise UserError(f"{folder / name} is not a readable safetensors file ({type(e).__name__}); it may be "
                            "truncated or corrupt") from None
    return state


def load_export(path: str | Path, map_location: str = "cpu", kind: str | None = None):
    """(model in eval mode, TextDataModule with the export's tokenizer) from a folder written by ``export``.

    The same contract as ``mdlm_kit.checkpoint.load_checkpoint``: a ``MaskedDiffusionLM`` or an
    ``AutoregressiveLM`` rebuilt from the hyperparameters in config.json with the weights of the safetensors
    file(s); ``kind`` (``diffusion`` or ``autoregressive``) makes any other kind an error.
    """
    from mdlm_kit.checkpoint import known_kwargs
    from mdlm_kit.data import TextDataModule
    from mdlm_kit.lightning import MODELS

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} is a folder but not an mdlm-kit export (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_file} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE:
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise UserError(f"{path} is a folder but not an mdlm-kit export (config.json has model_type {found!r})")
    cls = MODELS.get(cfg.get("kind", "diffusion"))
    if cls is None or not isinstance(cfg.get("model_hparams"), dict):
        raise UserError(f"{cfg_file}: no model kind/model_hparams that mdlm-kit knows; re-export the checkpoint")
    if kind is not None and cls.kind != kind:
        need = {"diffusion": "a masked diffusion model", "autoregressive": "an autoregressive model"}[kind]
        raise UserError(f"{path} holds the {cls.kind} model {cls.__name__}; this command needs {need}")
    model = cls(**known_kwargs(cls, cfg["model_hparams"]))
    state = _read_weights(path, map_location)
    prefix = "backbone."
    if any(not k.startswith(prefix) for k in state):
        raise UserError(f"{path}: weights outside the backbone ({next(k for k in state if not k.startswith(prefix))})")
    try:
        model.backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model described in it ({str(e).splitlines()[0]})") from None
    model.eval()
    dm = TextDataModule(**known_kwargs(TextDataModule, cfg.get("data_hparams") or {}))
    if cfg.get("tokenizer_spec") is not None:
        dm.load_state_dict({"tokenizer": cfg["tokenizer_spec"]})
    return model, dm
