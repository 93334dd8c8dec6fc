"""`edgekit serve`: an OpenAI-compatible HTTP endpoint over edgekit.runtime (app.py), with
one generating worker behind a bounded queue (worker.py), the model itself in a child process
(process.py)."""

from edgekit.serve.app import create_app, require_server_libs, serve

__all__ = ["create_app", "require_server_libs", "serve"]
