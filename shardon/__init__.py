"""Shardon: an OpenAI-compatible LLM routing and scheduling gateway."""

__version__ = "0.1.0"
