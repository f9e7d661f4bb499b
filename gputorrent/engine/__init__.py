"""Inference backends. ``LlamaEngine`` (llama.cpp, whole model, batched) is imported lazily:
loading llama-cpp-python costs time that commands which never infer should not pay."""

from .base import EngineError, Event, Failed, Finished, Job, Load, Tokens

__all__ = ["EngineError", "Event", "Failed", "Finished", "Job", "Load", "Tokens"]
