"""Triton kernels, installed as ``mdlm_kit.kernels``: each beside a pure-torch reference with the same signature.
Importing this package never imports Triton."""

from importlib.util import find_spec
from typing import Literal

import torch

# The one kernel switch, an argument of every function that has a kernel: ``auto`` runs the Triton kernel on CUDA
# tensors and the torch reference elsewhere; ``always`` forces the kernel (tests run it under TRITON_INTERPRET=1)
Kernel = Literal["auto", "always", "never"]


def use_kernel(kernel: Kernel, x: torch.Tensor) -> bool:
    """Whether ``kernel`` asks for the Triton kernel on tensors like ``x``."""
    if kernel != "auto":
        return kernel == "always"
    return x.is_cuda and find_spec("triton") is not None
