"""The control plane's routes, one module-level router per resource (`control.py` includes them)."""
