"""``mdlm-kit genppl``: generative perplexity of samples under a scorer causal LM, with diversity.

Gen-PPL alone rewards dull, repetitive text (a sampler that repeats one word scores well), so it is
reported with the samples' unigram entropy and distinct-n-gram ratios.

What is scored and counted:

- The scorer is a Hugging Face causal LM (a hub name such as ``gpt2-large``, or a local folder) or an
  autoregressive checkpoint of this toolkit (``AutoregressiveLM``, e.g. ``configs/shakespeare_ar.yaml``).
- Samples are the JSON lines ``mdlm-kit generate`` writes. When the scorer is a toolkit checkpoint
  with the same tokenizer (the records' ``tokenizer`` fingerprint), the sampled token ids are scored
  as they are, each conditioned on the ones before it; the given tokens (BOS and prompt,
  ``prompt_tokens``) are context, not scored. Otherwise the text is retokenized with the scorer's
  tokenizer (the prompt and the generated part separately, the prompt as unscored context), a BOS
  (the scorer's, else its EOS; the start token for toolkit checkpoints) is put in front and every
  generated token is scored; text longer than the scorer's context is cut into windows, each
  starting afresh after a BOS.
- ``gen_ppl`` = exp(total NLL / total scored tokens) over all samples; ``stderr`` is the standard
  error of the per-token NLL over samples, ``ci95`` the resulting perplexity interval.
- ``entropy``: the mean over samples of the entropy (nats) of a sample's own token frequencies, and
  ``distinct_n``: the mean over samples of (distinct n-grams / n-grams), both on the sampled token
  ids without the given tokens (on the scorer's tokens for records without ``tokens``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from mdlm_kit.errors import UserError


def read_samples(path: str) -> list[dict]:
    from mdlm_kit.data.corpora import read_jsonl_records

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--samples: no such file: {path} (write one with mdlm-kit generate --output FILE.jsonl)")
    records = read_jsonl_records(p, "text")
    if len(records) < 2:
        raise UserError(f"--samples {path} holds {len(records)} samples; gen-PPL with an error bar needs at least 2")
    return records


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]


def _retokenize(rec: dict, encode) -> tuple[list[int], int]:
    """(ids, context): the prompt, when the record names it, is context and not scored."""
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        context = encode(prompt) if prompt else []
        return context + encode(completion), len(context)
    return encode(rec["text"]), 0


class ToolkitScorer:
    """An ``AutoregressiveLM`` checkpoint of this toolkit."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        from mdlm_kit.checkpoint import load_checkpoint

        self.model, dm = load_checkpoint(checkpoint, kind="autoregressive")
        self.model.to(device)
        if dm.tokenizer is None:
            dm.prepare()
        self.tokenizer = dm.tokenizer
        self.name = str(checkpoint)
        self.max_len = self.model.config.max_seq_len

    def prepare(self, rec: dict) -> tuple[list[int], int, bool]:
        """(ids, number of leading context tokens not scored, retokenized?)"""
        tokens = rec.get("tokens")
        if rec.get("tokenizer") == self.tokenizer.fingerprint() and isinstance(tokens, list) and tokens:
            return [int(t) for t in tokens], int(rec.get("prompt_tokens", 0)), False
        return *_retokenize(rec, self.tokenizer.encode), True

    @torch.no_grad()
    def nll(self, ids: list[int], context: int) -> tuple[float, int]:
        """Summed -log p of ids[context:] (each given all before it within its window), and their count."""
        from mdlm_kit.objective import subs_log_probs

        total, count, offset = 0.0, 0, 0
        for window in _windows(ids, self.max_len):
            x = torch.tensor([window], dtype=torch.long, device=self.model.device)
            start = torch.full((1, 1), self.model.mask_id, dtype=torch.long, device=x.device)
            logp = subs_log_probs(self.model.backbone(torch.cat([start, x[:, :-1]], 1)), self.model.mask_id)
            nll = -logp[0].gather(-1, x[0].unsqueeze(-1)).squeeze(-1).double()
            scored = torch.arange(len(window), device=x.device) + offset >= context
            total += float(nll[scored].sum())
            count += int(scored.sum())
            offset += len(window)
        return total, count


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
        self.name = name
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if bos is None:
            raise UserError(f"--scorer {name}: its tokenizer has neither a BOS nor an EOS token to start from")
        self.bos = bos
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", None) or 1024)

    def prepare(self, rec: dict) -> tuple[list[int], int, bool]:
        return *_retokenize(rec, lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]), True

    @torch.no_grad()
    def nll(self, ids: list[int], context: int) -> tuple[float, int]:
        total, count, offset = 0.0, 0, 0
        for window in _windows(ids, self.max_len - 1):
            if not window:
                continue
            x = torch.tensor([[self.bos, *window]], dtype=torch.long, device=self.model.device)
            logits = self.model(input_ids=x).logits[:, :-1].float()
            nll = -torch.log_softmax(logits, -1)[0].gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).double()
            scored = torch.arange(len(window), device=nll.device) + offset >= context
            total += float(nll[scored].sum())
            count += int(scored.sum())
            offset += len(window)
        return total, count


def make_scorer(scorer: str, device: str = "cpu"):
    if scorer.endswith(".ckpt"):
        if not Path(scorer).expanduser().is_file():
            raise UserError(f"--scorer: checkpoint not found: {scorer}")
        return ToolkitScorer(scorer, device)
    from mdlm_kit.checkpoint import is_export

    if is_export(Path(scorer).expanduser()):
        return ToolkitScorer(scorer, device)
    return HFScorer(scorer, device)


def diversity(token_lists: list[list[int]], max_n: int = 4) -> dict:
    """Mean per-sample unigram entropy (nats, with its standard error) and distinct-n ratios."""
    ent = []
    distinct = {n: [] for n in range(1, max_n + 1)}
    for toks in token_lists:
        if not toks:
            continue
        counts = torch.tensor(list(Counter(toks).values()), dtype=torch.float64)
        p = counts / counts.sum()
        ent.append(float(-(p * p.log()).sum()))
        for n in distinct:
            grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
            if grams:
                distinct[n].append(len(set(grams)) / len(grams))
    e = torch.tensor(ent, dtype=torch.float64)
    out = {
        "entropy": float(e.mean()),
        "entropy_stderr": float(e.std() / math.sqrt(len(e))) if len(e) > 1 else math.nan,
    }
    for n, vals in distinct.items():
        out[f"distinct_{n}"] = sum(vals) / len(vals) if vals else math.nan
    return out


def genppl(samples: str, scorer: str = "gpt2-large", device: str = "auto") -> dict:
    """Generative perplexity of samples under a causal LM, with their entropy and distinct-n ratios.

    Args:
        samples: JSON lines written by ``mdlm-kit generate --output FILE.jsonl``.
        scorer: a Hugging Face causal LM (hub name or local folder; ``gpt2-large`` as in the MDLM paper)
            or an ``AutoregressiveLM`` checkpoint (``.ckpt``) of this toolkit, or its ``mdlm-kit export`` folder.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    from mdlm_kit.eval.likelihood import ratio_stderr

    records = read_samples(samples)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sc = make_scorer(scorer, device)
    sums, counts, retok, stat_tokens = [], [], set(), []
    for rec in records:
        ids, context, retokenized = sc.prepare(rec)
        retok.add(retokenized)
        s, c = sc.nll(ids, context)
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
    nll = float(s.sum() / c.sum())
    se = ratio_stderr(s, c)
    return {
        "gen_ppl": math.exp(nll),
        "gen_nll": nll,
        "stderr": se,
        "ci95": [math.exp(nll - 1.96 * se), math.exp(nll + 1.96 * se)],
        **diversity(stat_tokens),
        "num_samples": len(sums),
        "num_scored_tokens": int(c.sum()),
        "scorer": sc.name,
        "scoring": "retokenized text" if True in retok else "sampled token ids (same tokenizer)",
        "samples": str(samples),
    }
