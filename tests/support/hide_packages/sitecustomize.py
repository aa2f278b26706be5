"""Makes the packages named in VIQ_HIDE_PACKAGES (comma-separated top-level names) look uninstalled, as on the
GPU machine (design/environment.md: no deepspeed, datasets or flash-attn): ``import`` raises ModuleNotFoundError,
``importlib.util.find_spec`` returns None and ``importlib.metadata`` finds no distribution, the three ways code
(transformers' availability checks included) asks whether a package is there.

A test starts a Python process with this folder first on PYTHONPATH; ``site`` imports it at start-up, before
anything else runs. A test helper, not library code: it reads its setting from the environment."""

from __future__ import annotations

import os
import sys
from importlib.machinery import PathFinder

HIDDEN = frozenset(n.strip() for n in os.environ.get("VIQ_HIDE_PACKAGES", "").split(",") if n.strip())


def _normal(name: str) -> str:
    return name.lower().replace("-", "_")


class HidingPathFinder(PathFinder):
    """The standard path finder, blind to the hidden packages and their distributions. It replaces
    PathFinder in sys.meta_path: a finder placed before it could only defer to it, which would still find them."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if _normal(fullname.partition(".")[0]) in HIDDEN:
            return None
        return super().find_spec(fullname, path, target)

    @classmethod
    def find_distributions(cls, context=None, **kwargs):
        for dist in super().find_distributions(context, **kwargs):
            if _normal(dist.metadata["Name"] or "") not in HIDDEN:
                yield dist


if HIDDEN:
    sys.meta_path[:] = [HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
    for _name in [m for m in sys.modules if _normal(m.partition(".")[0]) in HIDDEN]:
        del sys.modules[_name]
