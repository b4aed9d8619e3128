"""Triton kernels, installed as ``mdlm_kit.kernels``.

Each kernel sits beside a pure-torch reference with the same signature; the
library calls the kernel on CUDA and the reference elsewhere. Importing this
package never imports Triton.
"""

from typing import Literal

import torch

# The one kernel switch, an argument of every function that has a kernel (the training loss, the samplers):
# ``auto`` runs the Triton kernel on CUDA tensors and the torch reference elsewhere; ``always`` forces the kernel
# (tests run it under TRITON_INTERPRET=1 on CPU); ``never`` the reference.
Kernel = Literal["auto", "always", "never"]


def use_kernel(kernel: Kernel, x: torch.Tensor) -> bool:
    """Whether ``kernel`` asks for the Triton kernel on tensors like ``x``."""
    if kernel == "always":
        return True
    if kernel != "auto" or not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
