"""Run code written against DeepEP (or DeepEP-Ascend) unchanged:

    python -m deep_ep_ops.compat train.py --its --args      # a script
    python -m deep_ep_ops.compat -m my_package.train        # a module

``from deep_ep import Buffer, Config`` and ``from deep_ep.utils import EventOverlap, EventHandle`` then
resolve to this package. The alias is an import finder placed *last* in ``sys.meta_path``, so it only
answers when no real ``deep_ep`` is installed: a real DeepEP always wins and is never shadowed. In
code you control, ``deep_ep_ops.compat.install()`` does the same in-process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
import types

# deep_ep module name -> names it re-exports from deep_ep_ops (resolved lazily at import time).
_MODULES = {
    "deep_ep": ("Buffer", "Config", "EventOverlap", "EventHandle"),
    "deep_ep.utils": ("EventOverlap", "EventHandle"),
    "deep_ep.buffer": ("Buffer", "Config", "EventOverlap"),
}


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        import deep_ep_ops

        for name in _MODULES[module.__name__]:
            setattr(module, name, getattr(deep_ep_ops, name))
        if module.__name__ == "deep_ep":
            module.__path__ = []  # a package, so that deep_ep.utils can be imported
        module.__doc__ = f"Alias of deep_ep_ops installed by deep_ep_ops.compat ({module.__name__})."


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _MODULES:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(), is_package=fullname == "deep_ep")
        return None


def install() -> None:
    """Lets ``import deep_ep`` resolve to deep_ep_ops when no real DeepEP is installed (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("deep_ep_ops.compat: expected a module name after -m")
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
