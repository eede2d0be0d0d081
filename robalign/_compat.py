"""Module paths of release 0.1, kept importable for one release.

The package is now layered (``robalign.ops`` → ``robalign.losses`` → ``robalign.app``). The old
flat paths (``robalign.trainer``, ``robalign.linear``, ...) resolve to the same module objects
through a meta-path finder, with a DeprecationWarning naming the new path; nothing is imported
before it is asked for, so ``import robalign`` stays as light as before. ``robalign.objectives``
and ``robalign.backends`` stay public names of the losses' objective registry and the ops'
backend registry, without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

PERMANENT = {
    "robalign.objectives": "robalign.losses.objectives",
    "robalign.backends": "robalign.ops.registry",
}
MOVED = {
    "robalign.library": "robalign.ops.library",
    "robalign.linear": "robalign.ops.linear",
    "robalign.cpu": "robalign.ops.cpu",
    "robalign.chunked": "robalign.ops.chunked",
    "robalign._cpp": "robalign.ops._cpp",
    "robalign.weights": "robalign.losses.weights",
    "robalign.dro": "robalign.losses.dro",
    "robalign.loss": "robalign.losses.loss",
    "robalign.data": "robalign.app.data",
    "robalign.trainer": "robalign.app.trainer",
    "robalign.train": "robalign.app.train",
    "robalign.cli": "robalign.app.cli",
    "robalign.demo": "robalign.app.demo",
    "robalign.toy": "robalign.app.toy",
    "robalign.ratio": "robalign.app.ratio",
    "robalign.ratio.classifier": "robalign.app.ratio.classifier",
    "robalign.ratio.data": "robalign.app.ratio.data",
    "robalign.ratio.features": "robalign.app.ratio.features",
    "robalign.ratio.weigh": "robalign.app.ratio.weigh",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        new = PERMANENT.get(fullname) or MOVED.get(fullname)
        if new is None:
            return None
        if fullname in MOVED:
            warnings.warn(f"`{fullname}` moved to `{new}`; the old path goes away in the next release",
                          DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, self, origin=new)

    def create_module(self, spec):
        module = importlib.import_module(spec.origin)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has just set __spec__ to the alias's spec: give the module back its own
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())      # before the path finder, which would find the files again
