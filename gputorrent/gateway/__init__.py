"""OpenAI- and Ollama-compatible HTTP gateway to the swarm (``gputorrent gateway``)."""

from .app import make_app
from .server import run_gateway

__all__ = ["make_app", "run_gateway"]
