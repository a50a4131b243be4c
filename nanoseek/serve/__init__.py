"""Serving: the OpenAI-compatible HTTP server over the engine, and the `generate` / `chat` / `serve` commands.

`create_app(model, tokenizer, model_name, ...)` (server.py) builds the FastAPI app; `commands.register` adds
the CLI subcommands. Imports are lazy so `nanoseek` commands that do not serve never load FastAPI.
"""

from __future__ import annotations

__all__ = ["ReasoningSplitter", "create_app", "register"]


def __getattr__(name):
    if name == "create_app":
        from .server import create_app

        return create_app
    if name == "register":
        from .commands import register

        return register
    if name == "ReasoningSplitter":
        from .reasoning import ReasoningSplitter

        return ReasoningSplitter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
