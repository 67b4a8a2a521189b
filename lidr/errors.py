"""Errors shown to the user as one message (no traceback) by the CLI, defined here so
the CLI can name them without importing the engines (torch, transformers)."""

from __future__ import annotations


class BackendError(RuntimeError):
    """A generation engine or server failed in a way the message explains (rows that
    failed after every retry, an engine process that could not start)."""
