"""``mdlm-kit genppl`` (README, "Generative perplexity"): given tokens (BOS, prompt) are context, not scored; text is
cut into windows of the scorer's context, each after a BOS (else EOS; toolkit checkpoints: the start token). Diversity
is measured on the sampled ids without the given tokens (the scorer's tokens for records without ``tokens``)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from mdlm_kit.errors import UserError
from mdlm_kit.eval.likelihood import ratio_stderr
from mdlm_kit.eval.ppl import Device, resolve_device
from mdlm_kit.objective import autoregressive_nll


def read_samples(path: str) -> list[dict]:
    from mdlm_kit.data.corpora import read_jsonl_records

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--samples: no such file: {path} (write one with mdlm-kit generate --output FILE.jsonl)")
    records = read_jsonl_records(p, "text")
    if len(records) < 2:
        raise UserError(f"--samples {path} holds {len(records)} samples; gen-PPL with an error bar needs at least 2")
    return records


def _retokenize(rec: dict, encode) -> tuple[list[int], int]:
    """(ids, context): the prompt, when the record names it, is context and not scored."""
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        context = encode(prompt) if prompt else []
        return context + encode(completion), len(context)
    return encode(rec["text"]), 0


class ToolkitScorer:
    """An autoregressive checkpoint of this toolkit."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        from mdlm_kit.io import load_checkpoint

        self.model, dm = load_checkpoint(checkpoint, kind="autoregressive")
        self.model.to(device)
        if dm.tokenizer is None:
            dm.prepare()
        self.tokenizer = dm.tokenizer
        self.name, self.window = str(checkpoint), self.model.config.max_seq_len

    def prepare(self, rec: dict) -> tuple[list[int], int, bool]:
        """(ids, number of leading context tokens not scored, retokenized?)"""
        tokens = rec.get("tokens")
        if rec.get("tokenizer") == self.tokenizer.fingerprint() and isinstance(tokens, list) and tokens:
            return [int(t) for t in tokens], int(rec.get("prompt_tokens", 0)), False
        return *_retokenize(rec, self.tokenizer.encode), True

    @torch.no_grad()
    def window_nll(self, window: list[int], scored: torch.Tensor) -> float:
        x = torch.tensor([window], device=self.model.device)
        # the context is given, not scored: the objective leaves it out as it leaves out padding
        terms = autoregressive_nll(self.model.backbone, x, self.model.mask_id, valid=scored[None].to(x.device))
        return float(terms.per_seq.sum())


class HFScorer:
    """A Hugging Face causal LM, by hub name or local folder."""

    def __init__(self, name: str, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mdlm_kit.data.tokenizers import _hub_reachable

        # offline, use the local Hugging Face cache only instead of sitting through the hub's retries
        local = Path(name).expanduser().is_dir() or not _hub_reachable()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
            self.model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local).to(device).eval()
        except Exception as e:  # hub unreachable, unknown name, not a causal LM
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"--scorer {name}: cannot load a causal LM ({first[:200]}); offline, give a local folder or an "
                "autoregressive checkpoint of this toolkit (mdlm-kit fit --config configs/shakespeare_ar.yaml)"
            ) from None
        self.name, tok = name, self.tokenizer
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if self.bos is None:
            raise UserError(f"--scorer {name}: its tokenizer has neither a BOS nor an EOS token to start from")
        self.window = int(getattr(self.model.config, "max_position_embeddings", None) or 1024) - 1  # BOS + window

    def prepare(self, rec: dict) -> tuple[list[int], int, bool]:
        return *_retokenize(rec, lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]), True

    @torch.no_grad()
    def window_nll(self, window: list[int], scored: torch.Tensor) -> float:
        x = torch.tensor([[self.bos, *window]], device=self.model.device)
        logits = self.model(input_ids=x).logits[:, :-1].float()
        nll = -torch.log_softmax(logits, -1)[0].gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).double()
        return float(nll[scored.to(nll.device)].sum())


def make_scorer(scorer: str, device: str = "cpu"):
    from mdlm_kit.io.ckpt import is_export

    if scorer.endswith(".ckpt") and not Path(scorer).expanduser().is_file():
        raise UserError(f"--scorer: checkpoint not found: {scorer}")
    if scorer.endswith(".ckpt") or is_export(Path(scorer).expanduser()):
        return ToolkitScorer(scorer, device)
    return HFScorer(scorer, device)


def score(scorer, ids: list[int], context: int) -> tuple[float, int]:
    """Summed -log p of ids[context:] under ``scorer``, each token given all before it within its window of
    ``scorer.window`` tokens (each window starts afresh after a BOS), and their count."""
    total, count = 0.0, 0
    for lo in range(0, len(ids), scorer.window):
        window = ids[lo : lo + scorer.window]
        scored = torch.arange(lo, lo + len(window)) >= context
        total += scorer.window_nll(window, scored)
        count += int(scored.sum())
    return total, count


def diversity(token_lists: list[list[int]], max_n: int = 4) -> dict:
    """Mean per-sample unigram entropy (nats, with its standard error) and distinct-n ratios."""
    ent, distinct = [], {n: [] for n in range(1, max_n + 1)}
    for toks in filter(None, token_lists):
        counts = torch.tensor(list(Counter(toks).values()), dtype=torch.float64)
        p = counts / counts.sum()
        ent.append(float(-(p * p.log()).sum()))
        for n in distinct:
            grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
            if grams:
                distinct[n].append(len(set(grams)) / len(grams))
    e = torch.tensor(ent, dtype=torch.float64)
    se = float(e.std() / math.sqrt(len(e))) if len(e) > 1 else math.nan
    return {"entropy": float(e.mean()), "entropy_stderr": se,
            **{f"distinct_{n}": sum(v) / len(v) if v else math.nan for n, v in distinct.items()}}


def genppl(samples: str, scorer: str = "gpt2-large", device: Device = "auto") -> dict:
    """Generative perplexity of samples under a causal LM, with their entropy and distinct-n ratios.

    Args:
        samples: JSON lines written by ``mdlm-kit generate --output FILE.jsonl``.
        scorer: a Hugging Face causal LM (hub name or local folder; ``gpt2-large`` as in the MDLM paper)
            or an autoregressive checkpoint (``.ckpt``) of this toolkit, or its ``mdlm-kit export`` folder.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    records = read_samples(samples)
    sc = make_scorer(scorer, resolve_device(device))
    sums, counts, retokenized, stat_tokens = [], [], False, []
    for rec in records:
        ids, context, retok = sc.prepare(rec)
        retokenized |= retok
        s, c = score(sc, ids, context)
        if c == 0:
            continue
        sums.append(s)
        counts.append(c)
        given = int(rec.get("prompt_tokens", 0))
        tokens = rec.get("tokens")
        stat_tokens.append([int(t) for t in tokens[given:]] if isinstance(tokens, list) else ids[context:])
    if len(sums) < 2:
        raise UserError(f"--samples {samples}: fewer than 2 samples have any token to score")
    s, c = torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)
    nll, se = float(s.sum() / c.sum()), ratio_stderr(s, c)
    return {"gen_ppl": math.exp(nll), "gen_nll": nll, "stderr": se,
            "ci95": [math.exp(nll - 1.96 * se), math.exp(nll + 1.96 * se)], **diversity(stat_tokens),
            "num_samples": len(sums), "num_scored_tokens": int(c.sum()), "scorer": sc.name,
            "scoring": "retokenized text" if retokenized else "sampled token ids (same tokenizer)",
            "samples": str(samples)}
