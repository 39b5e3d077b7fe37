"""deep_ep_ops: expert-parallel dispatch/combine for MoE models as ``torch.ops.deepep`` custom ops.

Layering (imports only go down; see README, *Architecture*):

    Buffer (DeepEP facade) → ops (typed raw ops) → torch.ops.deepep.* → op kernels (normal, low_latency, fused)
        → transports (backends, one registry) and compute (hot loops as private ops; csrc/ for C++)
    _schemas (index of every op) · meta_kernels (fakes + shared checks, on leaf modules only)

``reference`` is the single-process oracle that defines every output. ``config`` is the only reader of
environment variables, and ``_registry`` holds the only module-level state.
"""

from . import _schemas  # noqa: F401  (defines torch.ops.deepep.*)
from . import compute  # noqa: E402  (pure-torch kernels of the private compute ops)

compute.load_native()  # the C++ kernels of csrc/, when built

import meta_kernels  # noqa: E402,F401  (fake kernels)

from . import fused, low_latency, normal  # noqa: E402,F401  (kernels + autograd)
from .buffer import Buffer  # noqa: E402
from .ffn import make_fused_weights  # noqa: E402
from .fused import FuseMode  # noqa: E402
from .tuning import Config  # noqa: E402
from .utils import EventHandle, EventOverlap  # noqa: E402

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "FuseMode", "make_fused_weights"]
__version__ = "0.1.0"
