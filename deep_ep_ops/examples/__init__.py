"""Runnable examples (``python -m deep_ep_ops.examples.<name>``); see each module's docstring."""
