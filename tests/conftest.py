"""Shared fixtures: real servers on localhost (see servers.py); one torch thread for tiny models."""

import pytest

from servers import llama_server


@pytest.fixture(scope="session")
def llama_url():
    """Base URL (…/v1) of llama-cpp-python's OpenAI-compatible server on the embedded GGUF."""
    with llama_server() as url:
        yield url


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a busy 2-core machine they stall each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
