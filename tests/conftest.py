"""Shared fixtures: real servers on localhost (see servers.py)."""

import pytest

from servers import llama_server


@pytest.fixture(scope="session")
def llama_url():
    """Base URL (…/v1) of llama-cpp-python's OpenAI-compatible server on the embedded GGUF."""
    with llama_server() as url:
        yield url
