"""An object as a config entry, read back from its attributes: schedules, families and samplers keep each constructor
argument as an attribute of the same name (``Schedule.spec``, ``Family.spec``, ``Sampler.options``)."""

from __future__ import annotations

import inspect


def init_args(obj) -> dict:
    """``obj``'s constructor arguments by name: its class's ``__init__`` parameters, and its parents' as long as
    an ``__init__`` forwards ``**kwargs`` to them."""
    out: dict = {}
    for cls in type(obj).__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        out |= {p.name: getattr(obj, p.name) for p in params if p.name != "self" and p.name not in out
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def spec(obj, **args) -> dict:
    """``obj`` as ``{class_path, init_args}`` (``args`` replace its own values)."""
    return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": {**init_args(obj), **args}}
