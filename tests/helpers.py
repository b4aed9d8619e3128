"""Shared helpers for the tests: running the CLI and making corpora."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mdlm_kit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
    )


def write_corpus(folder: Path, n_docs: int = 8, lines: int = 150, seed: int = 0) -> Path:
    """A small corpus with learnable structure: sentences over a fixed word list."""
    rng = random.Random(seed)
    words = "the king and queen of the realm spoke softly while a fool sang of love and war".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(lines))
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder
