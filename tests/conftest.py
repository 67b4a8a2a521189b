"""Shared fixtures: real servers on localhost (see servers.py); one torch thread for tiny models."""

import contextlib

import pytest

from servers import llama_server


@pytest.fixture(scope="session")
def llama_url():
    """Base URL (…/v1) of llama-cpp-python's OpenAI-compatible server on the embedded GGUF."""
    with llama_server() as url:
        yield url


class RecordedAttention:
    """A stand-in for `lidr.models.gpu_attention` (monkeypatched where a module calls it): the
    devices it was entered for, and whether a call runs inside it now (`inside`)."""

    def __init__(self):
        self.devices, self.inside = [], False

    @contextlib.contextmanager
    def __call__(self, device):
        self.devices.append(device)
        before, self.inside = self.inside, True
        try:
            yield
        finally:
            self.inside = before


@pytest.fixture
def recorded_attention():
    return RecordedAttention()


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a busy 2-core machine they stall each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
