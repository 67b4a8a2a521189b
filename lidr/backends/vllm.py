"""Generation with vLLM's offline engine (`vllm.LLM`), for GPUs (or vLLM's CPU build).

vllm is imported only here, and only in the engine processes: a machine that never
chooses `generation.backend: vllm` never needs it installed.

Each replica of the engine runs in a Python process of its own, for two reasons:
`close()` then frees every byte of GPU memory the engine took (training follows in the
same process), and data parallelism is just several such processes, replica i on its
own `tensor_parallel_size` GPUs (CUDA_VISIBLE_DEVICES), each given a share of the rows
(`vllm.LLM(data_parallel_size>1)` is not supported in one process). The replicas are
plain subprocesses talking pickles over stdin/stdout, not multiprocessing children, so
they work whatever the caller's main module is (`python -m lidr`, pytest, a notebook).

Prompts go in as token ids made by the same tokenizer call as the hf backend
(`add_special_tokens=False`: the templates already hold BOS and the chat tokens), so
vLLM sees exactly the tokens hf would. Each row has its own SamplingParams (greedy, its
stop strings kept in the text, the repetition penalty), and `finish_reason` is mapped to
"stop" / "length".
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

from lidr.backends.hf import Generation
from lidr.errors import BackendError
from lidr.models import load_tokenizer


class VLLMError(BackendError):
    pass


def _engine_kwargs(settings, dtype: str, trust_remote_code: bool) -> dict:
    kw = {
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": dtype,  # vLLM takes "auto", "bfloat16", "float16", "float32"
        "trust_remote_code": trust_remote_code,
        "enforce_eager": settings.enforce_eager,
        "seed": 0,
    }
    if settings.max_model_len:
        kw["max_model_len"] = settings.max_model_len
    kw.update(settings.engine_args or {})
    return kw


def _serve() -> None:
    """One engine replica (`python -c "from lidr.backends.vllm import _serve; _serve()"`):
    read the model and engine arguments, then generation jobs, from stdin (pickled); send
    answers to the original stdout, while everything printed (vLLM's logs) goes to stderr."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    jobs = sys.stdin.buffer

    def send(msg) -> None:
        pickle.dump(msg, channel)
        channel.flush()

    try:
        model, engine_kwargs = pickle.load(jobs)
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, **engine_kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        send(("error", traceback.format_exc()))
        return
    send(("ready", None))
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:  # the parent went away
            break
        if job is None:
            break
        try:
            token_ids, params = job
            outs = llm.generate(
                [{"prompt_token_ids": ids} for ids in token_ids],
                [SamplingParams(**p) for p in params],
                use_tqdm=False,
            )
            send(("ok", [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]))
        except BaseException:  # noqa: BLE001
            send(("error", traceback.format_exc()))


def _device_groups(dp: int, tp: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica (None: leave the environment as it is)."""
    if dp == 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001
            ids = []
    if not ids:  # vLLM's CPU build: replicas share the CPU
        return [None] * dp
    if len(ids) < dp * tp:
        raise VLLMError(
            f"generation.vllm asks for {dp} replicas x {tp} GPUs = {dp * tp} GPUs, but {len(ids)} are visible"
        )
    return [",".join(ids[i * tp:(i + 1) * tp]) for i in range(dp)]


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str | Path, dtype: str = "auto", trust_remote_code: bool = False, settings=None):
        if settings is None:
            from lidr.config import VllmConfig

            settings = VllmConfig()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        kwargs = _engine_kwargs(settings, dtype, trust_remote_code)
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # the child imports lidr from where this process did, installed or not
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self._workers: list[subprocess.Popen] = []
        try:
            for devices in _device_groups(settings.data_parallel_size, settings.tensor_parallel_size):
                wenv = dict(env, **({"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {}))
                proc = subprocess.Popen(
                    [sys.executable, "-c", "from lidr.backends.vllm import _serve; _serve()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=wenv,
                )
                self._workers.append(proc)
                self._send(proc, (str(model_path), kwargs))
            for proc in self._workers:  # the engines load in parallel; wait for each
                self._receive(proc, "starting vLLM")
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    @staticmethod
    def _send(proc, msg) -> None:
        pickle.dump(msg, proc.stdin)
        proc.stdin.flush()

    @staticmethod
    def _receive(proc, what: str):
        try:
            status, payload = pickle.load(proc.stdout)
        except EOFError:
            raise VLLMError(f"{what}: the vLLM engine process exited (code {proc.wait()}); "
                            "its log is above") from None
        if status == "error":
            raise VLLMError(f"{what} failed in the vLLM engine process:\n{payload}")
        return payload

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        stops: list[list[str]] | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[Generation]:
        """Greedy continuations; `stops[i]` lists the strings that end row i (kept in the text)."""
        stops = stops or [[] for _ in prompts]
        token_ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        params = [
            dict(temperature=0.0, max_tokens=max_new_tokens, stop=list(s) or None,
                 include_stop_str_in_output=True, repetition_penalty=repetition_penalty)
            for s in stops
        ]
        n = len(self._workers)
        shards = [list(range(i, len(prompts), n)) for i in range(n)]  # round robin: similar lengths each
        busy = []
        for proc, rows in zip(self._workers, shards):
            if rows:
                self._send(proc, ([token_ids[i] for i in rows], [params[i] for i in rows]))
                busy.append((proc, rows))
        results: list[Generation | None] = [None] * len(prompts)
        error = None
        for proc, rows in busy:  # every replica's answer is read, so none is left in a pipe
            try:
                outs = self._receive(proc, "generation")
            except VLLMError as e:
                error = error or e
                continue
            for i, (text, reason) in zip(rows, outs):
                # vLLM: "stop" (EOS or a stop string), "length", "abort"
                results[i] = Generation(text=text, finish_reason="length" if reason == "length" else "stop")
        if error is not None:
            raise error
        return results  # type: ignore[return-value]

    def close(self) -> None:
        workers, self._workers = getattr(self, "_workers", []), []
        for proc in workers:
            try:
                self._send(proc, None)
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
