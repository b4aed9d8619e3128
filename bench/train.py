"""Training step speed and peak memory: this toolkit's step vs the reference projects' step, in one run.

    python bench/train.py [--size tiny] [--vocab 50258] [--seq_len 256] [--batch_size 8] [--steps 6]

Both steps train the same DiT (same initial weights) on the same random tokens with the same times
and masks (the toolkit's counter-based noise) and the same AdamW:

- reference: full logits at every position, SUBS by setting the mask token's logit to -inf,
  ``F.cross_entropy`` on all positions, multiplied by the mask and the NELBO weight (how the
  reference implementations compute the loss);
- toolkit: ``mdlm_kit.objective.nelbo`` with the masked-only head and the fused weighted
  cross-entropy (``nelbo(model.features, ..., head=model.head)``).

Each runs in its own process (``--worker``) so that peak memory is its own: resident set size
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU. ``mfu`` is the achieved model
FLOP/s of the toolkit's step (the FLOPs the step needs: 6 x non-embedding parameters x tokens,
attention, and the output head for the masked rows) over the machine's matmul FLOP/s, measured here
with a large float32 (or bf16 on GPU) matrix product. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mdlm_kit import rng
from mdlm_kit.models import DiT, DiTConfig
from mdlm_kit.objective import nelbo
from mdlm_kit.schedules import make_schedule


def reference_loss(model, x0, t, u, schedule, mask_id):
    """The reference projects' loss: full logits, mask logit -inf, cross-entropy at every position."""
    rate, weight = schedule.mask_rate(t), schedule.weight(t)
    masked = u < rate[:, None]
    zt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(zt).float()
    logits[..., mask_id] = float("-inf")
    nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), x0.view(-1), reduction="none").view_as(x0)
    return (nll * masked * weight[:, None].float()).sum() / x0.numel()


def toolkit_loss(model, x0, t, u, schedule, mask_id):
    return nelbo(model.features, x0, t, u, schedule, mask_id, head=model.head).per_token()


def step_flops(cfg: DiTConfig, batch: int, seq_len: int, masked_rows: float) -> float:
    """Training FLOPs (forward + backward = 3 x forward) the masked-only step needs."""
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + 2 * cfg.mlp_ratio * d * d  # qkv + out, MLP: parameters per layer
    body = 2 * per_layer * L * batch * seq_len  # matmuls, forward
    attn = 2 * 2 * L * batch * seq_len * seq_len * d  # q k^T and attention x v, forward
    head = 2 * d * cfg.vocab_size * masked_rows  # output projection of the masked rows, forward
    return 3.0 * (body + attn + head)


def matmul_flops_per_second(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(args) -> dict:
    device = args.device
    torch.manual_seed(args.seed)
    cfg = DiTConfig.from_name(args.size, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 256))
    model = DiT(cfg).to(device)
    for p in model.final.parameters():  # the zero-initialized head would make the loss trivial
        torch.nn.init.normal_(p, std=0.02)
    fused = {"auto": device in ("cuda", "cpu"), "on": True, "off": False}[args.fused_adamw]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    schedule, mask_id = make_schedule("loglinear"), args.vocab - 1
    loss_fn = reference_loss if args.worker == "reference" else toolkit_loss
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 and device == "cuda" else None
    if args.compile:
        for block in model.blocks:
            block.compile()
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randint(0, mask_id, (args.batch_size, args.seq_len), generator=gen).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, masked_rows = [], []
    for step in range(args.warmup + args.steps):
        keys = torch.arange(step * args.batch_size, (step + 1) * args.batch_size, device=device)
        t = rng.stratified_times(args.seed, rng.STREAM_TRAIN, keys)
        u = rng.token_uniforms(args.seed, rng.STREAM_TRAIN, keys, args.seq_len)
        sync(device)
        start = time.perf_counter()
        if autocast is not None:
            with autocast:
                loss = loss_fn(model, x0, t, u, schedule, mask_id)
        else:
            loss = loss_fn(model, x0, t, u, schedule, mask_id)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            masked_rows.append(float((u < schedule.mask_rate(t)[:, None]).sum()))
    seconds = sum(times)
    tokens = args.batch_size * args.seq_len * len(times)
    out = {"tokens_per_second": tokens / seconds, "loss": float(loss), "steps": len(times)}
    if device == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_mem_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out["model_flops"] = sum(step_flops(cfg, args.batch_size, args.seq_len, m) for m in masked_rows) / seconds
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (both steps)")
    p.add_argument("--fused_adamw", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA and CPU")
    p.add_argument("--worker", choices=["reference", "toolkit"], default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    results = {}
    for name in ("reference", "toolkit"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr)
    dtype = torch.bfloat16 if args.bf16 and args.device == "cuda" else torch.float32
    peak = matmul_flops_per_second(args.device, dtype)
    ref, ours = results["reference"], results["toolkit"]
    summary = {
        "bench": "train",
        "device": args.device,
        "size": args.size,
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "bf16": args.bf16,
        "compile": args.compile,
        "fused_adamw": args.fused_adamw,
        "reference_tokens_per_second": ref["tokens_per_second"],
        "toolkit_tokens_per_second": ours["tokens_per_second"],
        "train_speedup_vs_reference": ours["tokens_per_second"] / ref["tokens_per_second"],
        "reference_peak_mem_mb": ref["peak_mem_bytes"] / 2**20,
        "toolkit_peak_mem_mb": ours["peak_mem_bytes"] / 2**20,
        "train_peak_mem_ratio_vs_reference": ours["peak_mem_bytes"] / ref["peak_mem_bytes"],
        "matmul_flops_per_second": peak,
        "toolkit_model_flops_per_second": ours["model_flops"],
        f"mfu_{'gpu' if args.device == 'cuda' else 'cpu'}": ours["model_flops"] / peak,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
