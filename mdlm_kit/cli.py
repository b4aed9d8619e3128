"""The ``mdlm-kit`` command: ``fit``/``validate`` are LightningCLI over ``LanguageModel`` and ``TextDataModule``;
every other command is one typed function (USAGE lists them). Mistakes a user can make (bad paths, bad values,
unknown keys) print one ``mdlm-kit: error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Literal

from mdlm_kit.errors import UserError

LIGHTNING_COMMANDS = ("fit", "validate")
USAGE = """usage: mdlm-kit COMMAND [options]

Masked discrete diffusion language models.

commands:
  fit        train a model:            mdlm-kit fit --config configs/shakespeare.yaml
  validate   evaluate on the val split: mdlm-kit validate --config CFG --ckpt_path CKPT
  generate   samples as JSON lines:      mdlm-kit generate --checkpoint CKPT --sampler fhs
                                        --num_samples N --length L --seed S [--prompt TEXT] [--output F.jsonl]
  ppl        perplexity (bound) with error bars as JSON:
                                        mdlm-kit ppl --checkpoint CKPT [--data PATH] [--num_t_samples K]
                                        [--num_steps T] [--plot FILE.png]
  genppl     gen-PPL of samples under a causal LM, with entropy and distinct-n:
                                        mdlm-kit genppl --samples F.jsonl [--scorer gpt2-large|AR.ckpt]
  check-likelihood  train on a source of known entropy, compare the bound with the truth:
                                        mdlm-kit check-likelihood [--source markov|iid] [--steps N]
  data prepare  tokenize a config's data into the token cache, report tokens, shards and tokens/s:
                                        mdlm-kit data prepare --config configs/owt_mdlm_small.yaml [--data.KEY V]
  export     a checkpoint as a Hugging Face model folder (safetensors, config, tokenizer):
                                        mdlm-kit export --checkpoint CKPT --out DIR
  report     NELBO, unigram entropy and bits/char of a checkpoint as JSON:
                                        mdlm-kit report --checkpoint CKPT [--num_samples 3]

Run `mdlm-kit COMMAND --help` for the options of a command.
"""


def _keep_record(record: logging.LogRecord) -> bool:
    """Lightning's advertising ("Tip:"), the seed line (the seed is in the run's config.yaml) and idle devices
    ("TPU available: False": only a device in use is worth a line) are dropped."""
    msg = str(record.msg)
    return not ("Tip:" in msg or msg.startswith("Seed set to") or " available: False" in msg)


def _quiet_lightning() -> None:
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).addFilter(_keep_record)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # every model defines configure_model (for FSDP2), and EMA with FSDP2 is refused with its own message
    warnings.filterwarnings("ignore", message=r".*WeightAveraging callback with a model that overrides the configure_m")


def _lightning_cli(argv: list[str] | None) -> None:
    from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import ModelParallelStrategy

    from mdlm_kit.callbacks import AtomicCheckpointIO, FinalCheckpoint, FSDP2Sharding, NonFiniteGuard, StepProgressBar
    from mdlm_kit.data import TextDataModule
    from mdlm_kit.io import InitWeights
    from mdlm_kit.io.ckpt import check_resume, is_flat, model_hparams, moved_settings, read_checkpoint, resolve_last
    from mdlm_kit.lightning import LanguageModel
    from mdlm_kit.lightning_gaps import CheckpointHparamsCLI
    from mdlm_kit.utils import check_writable_folder

    class MdlmCLI(CheckpointHparamsCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: LightningCLI.subcommands()[k] for k in LIGHTNING_COMMANDS}

        def add_arguments_to_parser(self, parser) -> None:
            # masked diffusion unless the config names another family; the data module shards each global batch by
            # rank itself (the same samples, and noise, for any number of processes) and resumes mid-epoch, which
            # Lightning's DistributedSampler would not
            parser.set_defaults({"model.family": {"class_path": "mdlm_kit.families.MaskedDiffusion"},
                                 "trainer.use_distributed_sampler": False})
            parser.link_arguments("data.model_vocab_size", "model.vocab_size", apply_on="instantiate")
            parser.add_argument("--checkpoint", type=str | None, default=None,
                                help="start from these weights (an mdlm-kit .ckpt, an export folder or an MDLM "
                                "checkpoint) of the same architecture: fine-tuning, or validating an export; "
                                "--ckpt_path resumes a run instead")
            parser.add_argument("--on_nonfinite", type=Literal["stop", "skip"], default="stop",
                                help="a non-finite loss or gradient stops the run (keeping the last good checkpoint) "
                                "or skips the step (10 in a row still stop it): callbacks.NonFiniteGuard")

        def _place_outputs(self) -> None:
            """Checkpoints in DIR/checkpoints (last.ckpt always, written atomically, also at the end of the run
            and on SIGTERM), CSV and TensorBoard logs under DIR; the toolkit's callbacks unless the config has them."""
            trainer, cfg, callbacks = self.trainer, self.config[self.subcommand], self.trainer.callbacks
            root = Path(trainer.default_root_dir)
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                    cb.dirpath, cb.save_last = str(root / "checkpoints"), True
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            # Lightning's default bar, not one the user chose
            callbacks[:] = [StepProgressBar() if type(cb) is RichProgressBar else cb for cb in callbacks]
            if not any(isinstance(cb, NonFiniteGuard) for cb in callbacks):
                # after every callback that touches gradients (its check must see what the optimizer will),
                # before the checkpoint callbacks (Lightning runs those last)
                at = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
                callbacks.insert(at, NonFiniteGuard(cfg.on_nonfinite))
            if isinstance(trainer.strategy, ModelParallelStrategy) and not any(
                    isinstance(cb, FSDP2Sharding) for cb in callbacks):
                callbacks.insert(0, FSDP2Sharding())
            if not any(isinstance(cb, FinalCheckpoint) for cb in callbacks):
                callbacks.append(FinalCheckpoint())  # after ModelCheckpoint: it saves first when due
            if cfg.get("checkpoint") and self.resume_path() is None:  # a resumed run's own weights win
                callbacks.insert(0, InitWeights(cfg.checkpoint))
            if cfg.trainer.logger in (None, True):
                trainer.loggers = [CSVLogger(str(root), name="csv")]
                if importlib.util.find_spec("tensorboard") is not None:  # the [tensorboard] extra
                    trainer.loggers.append(TensorBoardLogger(str(root), name="tensorboard", default_hp_metric=False))

        def checkpoint_hparams(self, path: str) -> dict | None:
            """The model settings of ``--ckpt_path``, which override the config's; settings this version does not
            know (another version's checkpoint) are dropped with a warning."""
            ckpt = read_checkpoint(path)
            stored = dict(ckpt.get("hyper_parameters") or {})
            if not stored:
                return None
            hparams = model_hparams(stored, ckpt.get("mdlm_kit_model"))
            log = logging.getLogger("mdlm_kit")
            unknown = [] if is_flat(stored) else sorted(k for k in stored if not k.startswith("_") and k not in hparams)
            if unknown:
                log.warning("--ckpt_path %s: ignoring model settings this version does not know: %s", path,
                            ", ".join(unknown))
            if moved := moved_settings(stored):
                log.warning("--ckpt_path %s: not carried over, set elsewhere now: %s", path, ", ".join(moved))
            hparams.pop("vocab_size", None)  # the data's (linked), which check_resume compares with the weights
            return {k: v for k, v in hparams.items() if v is not None}

        def resume_path(self) -> str | None:
            """``--ckpt_path``, with ``last`` the newest last.ckpt, or None if there is none yet (Lightning then
            starts afresh: a requeued job's first run)."""
            ckpt = self.config[self.subcommand].get("ckpt_path")
            if ckpt == "last":
                ckpt = resolve_last([cb.dirpath for cb in self.trainer.checkpoint_callbacks
                                     if getattr(cb, "dirpath", None)])
            return ckpt

        def before_fit(self) -> None:
            """Place the outputs, then refuse before anything is written what would fail later (an unwritable folder,
            data that does not fit the model, a missing, broken or foreign checkpoint to resume)."""
            self._place_outputs()
            for cb in self.trainer.callbacks:
                if isinstance(cb, InitWeights):
                    cb.check(self.model)
            self.model.check_optimization()
            check_writable_folder(self.trainer.default_root_dir, "trainer.default_root_dir", create=True)
            self.model.check_data(self.datamodule)
            ckpt = self.resume_path()
            if ckpt is not None and ckpt not in ("best", "hpc", "registry"):
                check_resume(ckpt, self.model, training=self.subcommand == "fit")

        before_validate = before_fit

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                print("\n".join(fit_summary(self.trainer, self.model, self.datamodule)), file=sys.stderr)

    _quiet_lightning()
    MdlmCLI(LanguageModel, TextDataModule, args=argv, seed_everything_default=0, save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False}, auto_configure_optimizers=False)


# a bound this close to the unigram entropy means the model predicts token frequencies and ignores context
UNIGRAM_WARN_RATIO = 0.97


def fit_summary(trainer, model, datamodule) -> list[str]:
    """The lines ``fit`` ends with: where ``last.ckpt`` is, the steps done (and why fewer than ``max_steps``), the
    last validation loss next to the unigram entropy, and a warning when the model has not learned context."""
    from mdlm_kit.callbacks import stop_reason

    last = next((cb.last_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")),
                None)
    steps, of = trainer.global_step, f" of {trainer.max_steps}" if trainer.max_steps != -1 else ""
    lines = []
    if (reason := stop_reason(trainer)) is not None:
        lines.append(f"mdlm-kit: warning: training stopped early at step {steps}{of}: {reason}; the model has not "
                     "had its full budget (resume with --ckpt_path last, or lift the limit)")
    where = f"last.ckpt at {last}" if last else "no checkpoint written"
    value = trainer.callback_metrics.get(f"val/{model.metric}")
    if value is None:
        return [*lines, f"mdlm-kit: fit done: {where}, {steps}{of} steps; no validation ran"]
    value, unigram = float(value), None
    with contextlib.suppress(UserError):  # a streamed validation split: no stored blocks to count
        unigram = datamodule.unigram_entropy("val")
    what = "NELBO" if model.metric == "nelbo" else "NLL"
    ratio = f", {value / unigram:.3f} of the unigram entropy {unigram:.3f}" if unigram else ""
    lines.append(f"mdlm-kit: fit done: {where}, {steps}{of} steps; validation {what} {value:.3f} nats/token{ratio}")
    if unigram and value >= UNIGRAM_WARN_RATIO * unigram:
        fixes = ["train longer (trainer.max_steps)"]
        if model.hparams.get("unigram_bias") is False:
            fixes.append("start the output bias at the token frequencies (model.unigram_bias: true)")
        if model.config.conv_kernel == 0:
            fixes.append("give the model a local convolution (model.backbone.conv_kernel: 3)")
        lines.append(
            f"mdlm-kit: warning: the validation {what} is within {1 - UNIGRAM_WARN_RATIO:.0%} of the unigram entropy: "
            f"the model predicts token frequencies and has not learned to use context yet; {' and '.join(fixes)}; "
            "see BENCHMARKS.md (the unigram plateau)")
    return lines


def _function(target: str, argv: list[str], print_json: bool = True):
    """``mdlm-kit CMD ARGS`` for a command that is one function (``module:name``): its options are its typed
    arguments (jsonargparse); its result is printed as one JSON line."""
    from jsonargparse import CLI

    module, name = target.split(":")
    result = CLI(getattr(importlib.import_module(module), name), args=argv, exit_on_error=False, as_positional=False)
    if print_json:
        print(json.dumps(result))
    return result


def _generate(argv: list[str]) -> None:
    from mdlm_kit.sampling import sampler_class

    def alias(name: str) -> str:  # a registered name (fhs) is its class; an unknown one is one line listing them
        return name if name.startswith(("{", "[")) or "." in name else sampler_class(name).__name__

    for i, arg in enumerate(argv):  # argv is main's own copy
        if arg.startswith("--sampler="):
            argv[i] = "--sampler=" + alias(arg[len("--sampler="):])
        elif arg == "--sampler" and i + 1 < len(argv):
            argv[i + 1] = alias(argv[i + 1])
    _function("mdlm_kit.generate:generate", argv, print_json=False)


def _check_likelihood(argv: list[str]) -> None:
    _quiet_lightning()
    if not _function("mdlm_kit.eval.check:likelihood_check", argv)["bound_respected"]:
        print("mdlm-kit: check failed: the NELBO is below the true entropy by more than 3 standard errors; "
              "the bound is invalid (check the objective's weights)", file=sys.stderr)
        sys.exit(1)


def _data(argv: list[str]) -> None:
    from mdlm_kit.data.prepare import prepare

    if not argv or argv[0] != "prepare":
        raise UserError("usage: mdlm-kit data prepare --config CONFIG.yaml [--data.KEY VALUE ...]")
    if any(a in ("-h", "--help") for a in argv[1:]):
        from jsonargparse import ArgumentParser

        from mdlm_kit.data import TextDataModule

        parser = ArgumentParser(prog="mdlm-kit data prepare")
        parser.add_argument("--config", help="a training config (its data: section is used); may repeat")
        parser.add_class_arguments(TextDataModule, "data")
        parser.add_argument("--no_progress", action="store_true", help="no progress bars")
        parser.print_help()
        return
    print(json.dumps(prepare(argv[1:])))


COMMANDS = {
    "data": _data,
    "export": functools.partial(_function, "mdlm_kit.io.export:export"),
    "report": functools.partial(_function, "mdlm_kit.eval.report:report", print_json=False),  # prints its own line
    "generate": _generate,
    "ppl": functools.partial(_function, "mdlm_kit.eval.ppl:perplexity"),
    "genppl": functools.partial(_function, "mdlm_kit.eval.genppl:genppl"),
    "check-likelihood": _check_likelihood,
}


def main(argv: list[str] | None = None) -> None:
    explicit = argv is not None
    argv = list(argv if explicit else sys.argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command = argv[0]
    if command not in LIGHTNING_COMMANDS and command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(LIGHTNING_COMMANDS + tuple(COMMANDS))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jsonargparse import ArgumentError

    try:
        if command in COMMANDS:
            COMMANDS[command](argv[1:])
        else:
            _lightning_cli(argv if explicit else None)
    except UserError as e:
        _fail(str(e))
    except ArgumentError as e:
        _fail(_one_line(str(e)))
    except KeyboardInterrupt:
        _fail("interrupted")
    except SystemExit as e:
        if type(e).__name__ != "SIGTERMException":  # Lightning's, raised after the step a SIGTERM arrived in
            raise
        print("mdlm-kit: stopped by SIGTERM; last.ckpt holds the last step: resume with --ckpt_path last",
              file=sys.stderr)
        sys.exit(128 + 15)
    except Exception as e:
        # jsonargparse wraps errors raised while instantiating a subclass-mode model: find ours in the chain
        seen, cause = set(), e
        while cause is not None and not isinstance(cause, UserError) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if not isinstance(cause, UserError):
            raise
        _fail(str(cause))


def _classes(key: str) -> list[type]:
    """The classes an option named ``key`` (``model.family``, ``schedule``) takes, when it is one of the toolkit's."""
    from mdlm_kit.families import FAMILIES
    from mdlm_kit.schedules import SCHEDULES

    return list({"schedule": SCHEDULES, "family": FAMILIES}.get(key.rsplit(".", 1)[-1], {}).values())


def _one_line(msg: str) -> str:
    """jsonargparse's nested report as one line: the option's full key, what is wrong, and the class that said it
    (``model.schedule: Option 'pwoer' is not accepted (by LogLinear)``)."""
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    keys, cls = [], None
    for ln in lines:
        if m := re.match(r'Parser key "([^"]+)":\s*(.*)', ln):
            keys.append(m.group(1))
            if m.group(2) and cls and not m.group(2).startswith("Does not validate"):
                return f"{'.'.join(keys)}: {m.group(2)} (by {cls})"
        elif m := re.match(r"- Problem with given class_path '([^']+)'", ln):
            cls = m.group(1).rsplit(".", 1)[-1]
        elif (m := re.match(r"Given value: (.*)", ln)) and keys and (cls or _classes(keys[-1])):
            known = _classes(keys[-1])  # a value no type of the option accepts
            choices = f"; choose one of: {', '.join(c.__name__ for c in known)}" if known else ""
            return f"{'.'.join(keys)}: invalid value {m.group(1)!r}{choices}" + (f" (by {cls})" if cls else "")
        elif cls and not ln.startswith(("- ", "Given value", "Subtypes", "Errors", "Does not validate")):
            return f"{'.'.join(keys)}: {ln} (by {cls})"
    if m := re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]):  # an option of a plain (not class_path) group
        return f"{m.group(1)}: {' '.join([m.group(2)] + lines[1:3]).strip()}"
    return " ".join(lines[:3])


def _fail(msg: str) -> None:
    print(f"mdlm-kit: error: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
