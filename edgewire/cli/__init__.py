"""The ``edgewire`` command line (``python -m edgewire.cli`` runs it too)."""

from edgewire.cli.app import app

__all__ = ["app"]
