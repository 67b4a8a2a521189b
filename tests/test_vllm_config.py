"""The vllm backend's settings, without vllm installed (the engine itself is tested by
`make test-vllm`, in a venv of its own): replicas and their GPUs, the engine arguments,
and that choosing another backend never imports vllm."""

from __future__ import annotations

import sys

import pytest

from lidr.backends.vllm import VLLMError, _device_groups, _engine_kwargs
from lidr.config import VllmConfig, load_config


def test_replicas_get_their_own_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5")
    assert _device_groups(1, 4) == [None]  # one replica: the environment as it is
    assert _device_groups(2, 2) == ["2,3", "4,5"]
    assert _device_groups(4, 1) == ["2", "3", "4", "5"]
    with pytest.raises(VLLMError, match="3 replicas x 2 GPUs = 6 GPUs, but 4"):
        _device_groups(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _device_groups(2, 1) == [None, None]  # no GPU (vLLM's CPU build): replicas share the CPU


def test_engine_arguments():
    kw = _engine_kwargs(VllmConfig(tensor_parallel_size=2, max_model_len=4096,
                                   engine_args={"enable_prefix_caching": True}), "bfloat16", False)
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096 and kw["dtype"] == "bfloat16"
    assert kw["enable_prefix_caching"] is True and "data_parallel_size" not in kw
    assert "max_model_len" not in _engine_kwargs(VllmConfig(), "auto", False)


def test_config_and_lazy_import():
    cfg = load_config(None, ["generation.backend=vllm", "generation.vllm.data_parallel_size=2"])
    assert cfg.generation.vllm.data_parallel_size == 2
    import lidr.backends.openai  # noqa: F401
    import lidr.backends.vllm  # noqa: F401

    assert "vllm" not in sys.modules  # only the engine processes import it
