"""Triton kernels, installed as ``mdlm_kit.kernels``.

Each kernel sits beside a pure-torch reference with the same signature; the
library calls the kernel on CUDA and the reference elsewhere. Importing this
package never imports Triton.
"""
