"""DeepEP's event helpers, usable on every device (``deep_ep.utils.EventOverlap`` / ``EventHandle``).

The CPU ops are synchronous, so on CPU an event is only a marker and waiting on it returns at once.
On CUDA, ``EventHandle`` records an event on the current stream, and ``current_stream_wait`` makes the
current stream wait for it.
"""

from __future__ import annotations

import torch


class EventHandle:
    """A point in a device stream (a no-op marker on CPU).

    Args:
        device: record on this device's current stream; CPU (or ``None``) records nothing.
    """

    def __init__(self, device: torch.device | str | None = None):
        self._event = None
        if device is not None and torch.device(device).type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def current_stream_wait(self) -> None:
        """Makes the current stream wait until this point (returns at once on CPU)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)


class EventOverlap:
    """DeepEP's wrapper around an optional :class:`EventHandle`, also usable as a context manager.

    Args:
        event: the event, or ``None`` when the op was not asynchronous.
        extra_tensors: tensors kept alive until the event is waited on (instead of ``record_stream``).
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes the current stream wait for the event (no-op without one)."""
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc_info) -> None:
        self.current_stream_wait()
