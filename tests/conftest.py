import os

import pytest
import torch

from helpers import CONFIGS, random_dit, run_cli, write_corpus

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, here and in the commands the tests start: the tensors are small, so a second thread buys little
# and costs a fork/join per op, and when other processes hold the cores a descheduled worker stalls every op (on a
# loaded 2-core machine test_objective.py took 162 s of CPU with two threads, 47 s with one; an ancestral sampling
# loop 92 s, 8 s). Float results depend on the thread count: this also makes them the same on bigger machines.
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
# Triton kernels run under the interpreter on machines without a GPU; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _reset_torch_state():
    """Each test starts from the same seed and default dtype."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    """A private cache directory for the whole session (tokenizers, token streams)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MDLM_KIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_root):
    """The debug recipe trained on a small structured corpus (about 20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("train")
    corpus = write_corpus(root / "corpus")
    out = root / "run"
    proc = run_cli(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--data.corpus", str(corpus),
        "--trainer.default_root_dir", str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "fit.stderr").write_text(proc.stderr)  # its closing lines are tested
    return out


@pytest.fixture(scope="session")
def trained_ckpt(trained):
    return trained / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny():
    """A random time-agnostic DiT over 4 tokens (+ the mask, id 4): small enough to enumerate."""
    return random_dit(vocab_size=5, n_layers=2, d_model=32, max_seq_len=8)
