"""The ``consortium`` command: run the server, and work with studies, sites and the catalogue."""

from consortium_server.cli.app import app, main

__all__ = ["app", "main"]
