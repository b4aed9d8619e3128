"""Evaluation, installed as ``mdlm_kit.eval``: likelihood bounds and run reports."""
