"""The HTTP surface: pure-ASGI chat endpoints on the hot path, FastAPI for the control plane."""
