"""Loads the optional C++ CPU kernels of ``csrc/`` (built by ``pip install`` as ``deep_ep_ops._C``).

Importing the extension runs its ``TORCH_LIBRARY_IMPL(deepep, CPU)`` registrations, which replace the
pure-torch CPU kernels of the private compute ops (see ``deep_ep_ops.compute``). Without the build the
package works unchanged on the pure-torch kernels. The dispatcher itself says whether they are loaded.
"""

from __future__ import annotations

import importlib

import torch

#: A private op every build of csrc/ implements; its CPU kernel tells whether the build is loaded.
_PROBE = "deepep::_gather_rows"


def load() -> None:
    """Imports the extension if it was built (called once by ``deep_ep_ops/__init__.py``)."""
    try:
        importlib.import_module("deep_ep_ops._C")
    except ImportError:
        pass


def loaded() -> bool:
    """Whether the C++ kernels are registered in this process."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE, "CPU")


def why_not() -> str:
    """Why :func:`loaded` is False (empty when it is True)."""
    if loaded():
        return ""
    try:
        importlib.import_module("deep_ep_ops._C")
    except ImportError as exc:
        return f"deep_ep_ops._C did not import: {exc}"
    return "deep_ep_ops._C imported but registered no CPU kernels"
