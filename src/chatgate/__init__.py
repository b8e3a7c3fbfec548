"""chatgate: a self-hosted gateway for chatting with your own OpenAI-compatible models."""

__version__ = "0.1.0"
