"""dockyard: a self-hosted, serverless-style function runner for Python."""

__version__ = "0.1.0"
