"""Module paths that moved, kept importable for one release.

An old path (``robalign.app.trl_trainer``, now ``robalign.trl``; ``robalign.reference``, the
float64 ground truth whose name read as the reference *model*, now ``robalign.ground_truth``) resolves to the same module object
through a meta-path finder, with a DeprecationWarning naming the new path; nothing is imported
before it is asked for, so ``import robalign`` stays as light as before. ``robalign.objectives``
and ``robalign.backends`` stay public names of the losses' objective registry and the ops'
backend registry, without a warning. Release 0.1's flat paths (``robalign.trainer``, ...) were
removed in 0.2.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

PERMANENT = {
    "robalign.objectives": "robalign.losses.objectives",
    "robalign.backends": "robalign.ops.registry",
}
MOVED = {                                                  # release 0.2; they go away in 0.3
    "robalign.app.trl_trainer": "robalign.trl",
    "robalign.reference": "robalign.ground_truth",         # and its submodules
    # the application grouped into folders (robalign.app.data is now the package of preferences.py)
    **{f"robalign.app.{old}": f"robalign.app.{new}" for old, new in (
        ("toy", "data.toy"), ("trainer", "training.trainer"), ("causal_lm", "training.causal_lm"),
        ("trl", "training.trl"), ("config", "training.config"), ("settings", "training.settings"),
        ("checkpoints", "training.checkpoints"), ("launch", "training.launch"), ("evaluate", "evaluation.accuracy"),
        ("samples", "evaluation.samples"), ("cli", "commands.cli"), ("train", "commands.train"),
        ("demo", "commands.demo"))},
}


def new_path(fullname: str) -> tuple[str | None, bool]:
    """The module an old path names, and whether the old path is deprecated (``None``: not an alias)."""
    if fullname in PERMANENT:
        return PERMANENT[fullname], False
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):], True
    return None, False


class _AliasSpec(importlib.machinery.ModuleSpec):
    """An old path's spec whose ``parent`` is the new module's package, so that ``python -m <old
    path>`` (runpy sets ``__package__`` from it) resolves the module's relative imports."""

    @property
    def parent(self):
        new, _ = new_path(self.name)
        return new if self.submodule_search_locations is not None else new.rpartition(".")[0]


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        new, deprecated = new_path(fullname)
        if new is None:
            return None
        if deprecated:
            warnings.warn(f"`{fullname}` moved to `{new}`; the old path goes away in the next release",
                          DeprecationWarning, stacklevel=2)
        return _AliasSpec(fullname, self, origin=new, is_package=self.is_package(fullname))

    def create_module(self, spec):
        module = importlib.import_module(spec.origin)
        spec.loader_state = module.__spec__
        return module

    def get_code(self, fullname):
        """The new module's code: what ``python -m <old path>`` (runpy) runs."""
        new, _ = new_path(fullname)
        return importlib.util.find_spec(new).loader.get_code(new)

    def is_package(self, fullname):
        new, _ = new_path(fullname)
        return importlib.util.find_spec(new).submodule_search_locations is not None

    def exec_module(self, module):
        # the import system has just set __spec__ to the alias's spec: give the module back its own
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())      # before the path finder, which would find the files again
