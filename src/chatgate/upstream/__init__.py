"""Talking to OpenAI-compatible model servers: the HTTP client and the SSE decoder."""
