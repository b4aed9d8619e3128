"""Checkpoints written before the one LightningModule (the flat settings of ``MaskedDiffusionLM`` and
``AutoregressiveLM``) still load, evaluate and resume: their settings become backbone, family, optimizer and
learning-rate schedule."""

import torch

from helpers import CONFIGS, run_main
from mdlm_kit.families import Autoregressive, MaskedDiffusion
from mdlm_kit.io import load_checkpoint
from mdlm_kit.io.ckpt import build_model, model_hparams, moved_settings
from mdlm_kit.schedules import Polynomial


def legacy(hparams: dict, kind: str = "MaskedDiffusionLM") -> dict:
    """The flat settings the old class would have saved for the same model (as LightningCLI stored them)."""
    family = hparams["family"]["init_args"] if kind == "MaskedDiffusionLM" else {}
    opt, sched = hparams["optimizer"]["init_args"], hparams["lr_scheduler"]["init_args"]
    flat = {**hparams["backbone"], "vocab_size": hparams["vocab_size"], "lr": opt["lr"], "betas": opt["betas"],
            "weight_decay": opt["weight_decay"], "warmup_steps": sched["warmup_steps"],
            "decay_steps": sched["decay_steps"], "min_lr_ratio": sched["min_lr_ratio"], "compile": False,
            "fused_adamw": None, "on_nonfinite": "stop", "unigram_bias": hparams["unigram_bias"],
            "_class_path": f"mdlm_kit.lightning.{kind}", "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    if family:
        flat.update({k: family[k] for k in ("schedule", "num_steps", "estimator", "time_conditioning", "seed",
                                            "masked_only")}, ce_kernel=family["kernel"])
    return flat


def test_flat_settings_become_typed_parts():
    old = {"vocab_size": 11, "size": "debug", "conv_kernel": 3, "schedule": "polynomial",
           "schedule_kwargs": {"power": 2.0}, "num_steps": 100, "estimator": "auto", "seed": 4, "ce_kernel": "never",
           "lr": 1e-3, "warmup_steps": 7, "decay_steps": 9, "fused_adamw": True, "compile": False,
           "_class_path": "mdlm_kit.lightning.MaskedDiffusionLM"}
    h = model_hparams(old)
    assert moved_settings(old) == ["fused_adamw=True (--model.optimizer.init_args.fused true)"]  # compile: default
    assert moved_settings(h) == []
    assert h["backbone"] == {"size": "debug", "conv_kernel": 3}
    assert h["optimizer"]["init_args"]["lr"] == 1e-3 and h["lr_scheduler"]["init_args"]["warmup_steps"] == 7
    model = build_model({"hyper_parameters": old})
    fam = model.family
    assert isinstance(fam, MaskedDiffusion) and isinstance(fam.schedule, Polynomial) and fam.schedule.power == 2.0
    assert (fam.num_steps, fam.estimator, fam.seed, fam.kernel) == (100, "time", 4, "never")  # auto: time, T given
    assert model.config.conv_kernel == 3 and model.config.n_layers == 2 and model.mask_id == 10
    ar = build_model({"hyper_parameters": {"vocab_size": 11, "size": "debug"}, "mdlm_kit_model": "autoregressive"})
    assert isinstance(ar.family, Autoregressive) and ar.backbone.causal


def test_a_legacy_checkpoint_evaluates_and_resumes_as_it_did(trained, trained_ckpt, tmp_path, capfd):
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"] = {**legacy(ckpt["hyper_parameters"]), "on_nonfinite": "skip"}
    old = tmp_path / "legacy.ckpt"
    torch.save(ckpt, old)
    (new_model, _), (old_model, _) = load_checkpoint(trained_ckpt), load_checkpoint(old)
    assert old_model.config == new_model.config and repr(old_model.family) == repr(new_model.family)
    x0 = torch.randint(0, new_model.mask_id, (4, 32), generator=torch.Generator().manual_seed(0))
    keys = torch.arange(4)
    with torch.no_grad():
        assert torch.equal(old_model.loss_terms(x0, keys, 2).per_seq, new_model.loss_terms(x0, keys, 2).per_seq)
    steps = int(ckpt["global_step"])
    proc = run_main(capfd, "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus",
                    str(trained.parent / "corpus"), "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--trainer.max_steps", str(steps + 2), "--ckpt_path", str(old))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{steps + 2} of {steps + 2} steps" in proc.stderr
    # a setting that moved out of the model is named, with where it is set now, not dropped in silence
    assert f"--ckpt_path {old}: not carried over, set elsewhere now: on_nonfinite='skip' (fit --on_nonfinite)" \
        in proc.stderr
