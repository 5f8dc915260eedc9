"""Moved to `tracekit.capture` (see its package docstring). Kept so that vLLM
environments installed before the move, whose entry points still name this module,
keep loading the plugin until they are reinstalled."""

from tracekit.capture.stat_logger import TracekitStepLogger
from tracekit.capture.vllm_hooks import register_general_plugin

__all__ = ["TracekitStepLogger", "register_general_plugin"]
