import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
