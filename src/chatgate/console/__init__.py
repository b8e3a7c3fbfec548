"""The web console: static files in this package, served by chatgate under `/` (`assets.py`)."""
