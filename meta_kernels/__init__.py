"""Fake (meta) kernels and the shared input checks of every ``torch.ops.deepep`` op.

No public API: imported once by ``deep_ep_ops/__init__.py`` for the registrations.
"""

from . import checks, compute, fused, low_latency, normal  # noqa: F401  (registration side effects)
