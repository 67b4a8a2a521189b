"""Saving model folders whose vocabulary matrices are files of their own, linked instead of
written again when a model keeps them as it loaded them.

A 262k-token vocabulary makes the embedding most of a small model: 671 of gemma-3-270m's
1072 MB in fp32. LoRA training does not change it (PEFT's "all-linear" targets the linear
layers but the output layer, which Gemma ties to the embedding), so M0, M1, M2 ... of a run
hold the same embedding bytes. `save_model` writes the model with transformers'
`save_pretrained`, but each vocabulary matrix (the input embedding, and the output layer where
it is not tied to it) goes to a file of its own, and model.safetensors.index.json lists the
files: an ordinary sharded checkpoint that transformers, vLLM and safetensors load as any
other. A matrix the caller knows to be as it was loaded from `source`, where one file holds it
alone, is hard-linked from that file (copied where the file system cannot link) instead of
written: for gemma-3-270m, 0.7-1.0 s less per save on this machine (bench/README.md, round 12).

A linked file is one file under two names, so writing into it in place would change every
folder that links it. lidr never does (every save writes a new folder and swaps it in), and
the names are not ones transformers' `save_pretrained` writes (model.safetensors,
model-0000k-of-0000n.safetensors), so saving another model into such a folder does not write
through a link either. (The tokenizer files are copied, not linked, for that reason:
`tokenizer.save_pretrained` writes tokenizer.json in place.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from lidr.direct_io import Reader, Writer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BODY = "model-body.safetensors"  # everything but the vocabulary matrices, when it fits one file
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def vocabulary_matrices(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The input embedding's weight and, where it is a tensor of its own, the output layer's,
    under the names `save_pretrained` saves them (a tied alias, e.g. lm_head.weight, is not).
    `state`: the model's state_dict, where the caller has it already."""
    state = model.state_dict() if state is None else state
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # aliases save_pretrained drops
    out: dict[str, torch.Tensor] = {}
    for get in (model.get_input_embeddings, model.get_output_embeddings):
        try:
            w = getattr(get(), "weight", None)
        except NotImplementedError:
            w = None
        if not isinstance(w, torch.Tensor) or any(_same(w, v) for v in out.values()):
            continue
        names = [k for k, v in state.items() if _same(v, w)]
        names = [k for k in names if k not in tied] or names
        if names:
            out[names[0]] = w
    return out


def save_model(model, out_dir: str | Path, *, source: str | Path | None = None,
               as_loaded: Sequence[torch.Tensor] = ()) -> dict[str, list[str]]:
    """`model.save_pretrained(out_dir)` in safetensors, with each vocabulary matrix in a file
    of its own. A matrix that is one of the tensors `as_loaded` (the caller's promise: its
    bytes are untouched since it was loaded from the folder `source`) is linked from the file
    of `source` that holds it alone, after a check of its dtype, shape and sampled rows;
    otherwise it is written. Returns the names linked and written."""
    out_dir = Path(out_dir)
    state = model.state_dict()
    vocab = vocabulary_matrices(model, state)
    body = {k: v for k, v in state.items() if not any(_same(v, w) for w in vocab.values())}
    model.save_pretrained(out_dir, state_dict=body, safe_serialization=True)
    weight_map = _weight_map(out_dir)
    if (out_dir / SINGLE).exists():  # the body in one file: named so it is not taken for the whole model
        os.replace(out_dir / SINGLE, out_dir / BODY)
        weight_map = {k: BODY for k in weight_map}

    done: dict[str, list[str]] = {"linked": [], "written": []}
    used = set(weight_map.values())
    for name, w in vocab.items():
        file = _file_name(name, used)
        used.add(file)
        kept = source is not None and any(w is t for t in as_loaded)
        linked = _linkable(Path(source), name, w) if kept else None
        if linked is not None:
            _link_or_copy(linked, out_dir / file)
        else:
            from safetensors.torch import save_file

            save_file({name: w.detach().contiguous()}, out_dir / file, metadata={"format": "pt"})
        done["linked" if linked is not None else "written"].append(name)
        weight_map[name] = file
    total = sum(_nbytes(out_dir / f) for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return done


class LowRank(NamedTuple):
    """A change of rank r to one stored 2-D tensor, `up @ down` (LoRA's B · α/r @ A): added to
    the stored tensor in one matrix product (`add_to`), so no full-size delta is ever made (400 MB
    for all of gemma-3-270m's LoRA layers in fp32). up: [out, r], down: [r, in]."""
    shape: tuple[int, ...]
    up: torch.Tensor
    down: torch.Tensor

    def add_to(self, stored: torch.Tensor) -> None:
        """stored += up @ down, in place, computed in the wider of the two dtypes and rounded once
        to the stored one (fp32 factors on bf16 weights: the sum in fp32), where `stored` is (the
        factors of a model trained on a GPU come to the weights read from the files)."""
        wide = torch.promote_types(stored.dtype, self.up.dtype)
        up, down = self.up.to(stored.device, wide), self.down.to(stored.device, wide)
        if wide == stored.dtype:
            stored.addmm_(up, down)
        else:
            stored.copy_(torch.addmm(stored.to(wide), up, down))


def save_with_deltas(source: str | Path, out_dir: str | Path, deltas: dict[str, LowRank],
                     on_merged: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, list[str]]:
    """The safetensors model folder `source` again in `out_dir`, with `deltas[name]` added to those
    tensors in the dtype each is stored in: a LoRA merge into the weights as stored, without
    loading the model. A file that holds no changed tensor is linked (lidr's embedding file);
    the others are written with the same header and layout, each tensor read from the
    source, the changed ones as `stored + delta`. config.json and
    generation_config.json are copied. `on_merged(name, tensor)` sees each changed tensor as
    written (in a buffer used again after the call). Returns the tensor names in linked and in
    written files.
    KeyError (before anything is written) for a delta whose tensor the folder does not hold, or
    holds in another shape or in a dtype other than fp32, bf16, fp16, fp64."""

    source, out_dir = Path(source), Path(out_dir)
    weight_map = _weight_map(source)
    headers = {file: _header(source / file) for file in set(weight_map.values())}
    for name, delta in deltas.items():
        entry = headers[weight_map[name]][1].get(name) if name in weight_map else None
        if entry is None or entry["shape"] != list(delta.shape) or entry["dtype"] not in _TORCH:
            raise KeyError(f"{source}: {name} is {entry and (entry['dtype'], entry['shape'])}, "
                           f"its delta {list(delta.shape)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[str]] = {"linked": [], "written": []}
    for file, (raw_header, header) in sorted(headers.items()):
        names = sorted(k for k in header if k != "__metadata__")
        if not any(n in deltas for n in names):
            _link_or_copy(source / file, out_dir / file)
            done["linked"] += names
            continue
        entries = sorted((header[k]["data_offsets"], k) for k in names)
        # Every tensor goes through one buffer, read into it and written from it: the buffer stays
        # in cache and needs no new pages, and the changed ones are merged in place there.
        buffer = torch.empty(max(max(end - start for (start, end), k in entries if k in deltas), _COPY_CHUNK),
                             dtype=torch.uint8)
        # Around the page cache where that is faster (lidr/direct_io.py): the file written is read
        # again only as the next train stage's source, and a source is read from the cache where
        # it is there (M0), else straight from the disk (M_t, written so by the last stage).
        with Reader(source / file) as src, Writer(out_dir / file) as out:
            out.write(len(raw_header).to_bytes(8, "little") + raw_header)  # the same tensors at the same offsets
            src.skip(8 + len(raw_header))
            for (start, end), name in entries:
                if name not in deltas:
                    _copy_bytes(src, out, end - start, buffer)
                    continue
                merged = buffer[:end - start]
                _read_exactly(src, merged)
                merged = merged.view(_TORCH[header[name]["dtype"]]).view(deltas[name].shape)
                deltas[name].add_to(merged)
                if on_merged is not None:
                    on_merged(name, merged)
                out.write(buffer[:end - start].numpy())
        done["written"] += names
    for extra in ("config.json", "generation_config.json", INDEX):
        if (source / extra).is_file():
            shutil.copyfile(source / extra, out_dir / extra)
    return done


_COPY_CHUNK = 8 << 20  # bytes of an unchanged tensor copied at a time


def _read_exactly(src: Reader, into: torch.Tensor) -> None:
    try:
        src.readinto(into.numpy())
    except EOFError:
        raise ValueError(f"{src.path}: the file ends before the tensors its header lists") from None


def _copy_bytes(src: Reader, out: Writer, n: int, buffer: torch.Tensor) -> None:
    """The next `n` bytes of `src` to `out`, through `buffer`."""
    while n:
        chunk = buffer[:min(n, buffer.numel())]
        _read_exactly(src, chunk)
        out.write(chunk.numpy())
        n -= chunk.numel()


def _header(path: Path) -> tuple[bytes, dict]:
    """A safetensors file's header: its bytes and what they say."""
    with path.open("rb") as f:
        raw = f.read(int.from_bytes(f.read(8), "little"))
    return raw, json.loads(raw)


def stored_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype of a safetensors model folder's floating-point weights, read from the files'
    headers; None where they differ or the folder has no safetensors files."""
    folder = Path(folder)
    try:
        found = {v["dtype"] for file in set(_weight_map(folder).values())
                 for k, v in _header(folder / file)[1].items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError):
        return None
    floating = {d for d in found if d.startswith(("F", "BF"))}  # not the integer buffers
    return _TORCH.get(floating.pop()) if len(floating) == 1 else None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor under two names (tied weights): the same memory, shape and dtype."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _file_name(name: str, used: set[str]) -> str:
    """model-embed_tokens.safetensors for model.embed_tokens.weight (a number added on a clash)."""
    parts = name.split(".")
    stem = f"model-{parts[-2] if len(parts) > 1 else parts[0]}"
    file, n = f"{stem}.safetensors", 2
    while file in used:
        file, n = f"{stem}-{n}.safetensors", n + 1
    return file


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file of a safetensors model folder (sharded or one file); {} for anything else."""
    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"])
    if (folder / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(folder / SINGLE, "pt") as f:
            return {k: SINGLE for k in f.keys()}
    return {}


def _linkable(source: Path, name: str, w: torch.Tensor) -> Path | None:
    """The file of `source` that holds `name` and nothing else, if its dtype and shape are w's
    and its first, middle and last rows are w's bits; else None."""
    from safetensors import safe_open

    try:
        files = _weight_map(source)
    except (OSError, ValueError, KeyError):
        return None
    path = source / files[name] if name in files else None
    if path is None or not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        if set(f.keys()) != {name}:  # the file holds other tensors too
            return None
        stored = f.get_slice(name)
        if stored.get_dtype() != _DTYPES.get(w.dtype) or list(stored.get_shape()) != list(w.shape):
            return None
        rows = w.shape[0] if w.dim() else 0
        for start in {0, rows // 2, max(rows - 8, 0)} if rows else ():
            if not _bits_equal(stored[start:start + 8], w.detach()[start:start + 8].cpu()):
                return None
    return path


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs and signed zeros included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(src, dst)


def _nbytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the header)."""
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


__all__ = ["LowRank", "save_model", "save_with_deltas", "stored_dtype", "vocabulary_matrices"]
