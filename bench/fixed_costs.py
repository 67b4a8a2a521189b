"""Fixed costs of a stage, the plain way against lidr's, side by side in one process.

What the demo's loop pays per stage outside model compute (bench/demo.py counts it as
overhead), on the embedded gemma-3-270m:

- tokenizer: `AutoTokenizer.from_pretrained` (what lidr ran before round 7) against lidr's
  `load_tokenizer`, which runs it with automatic garbage collection paused (lidr/models.py);
  the ids of the demo prompts are compared;
- LoRA merge: PEFT's `merge_and_unload` against `lidr.pipeline.train.merge_lora` (new memory
  instead of in-place adds into the memory-mapped weights); the merged weights are compared;
- closing a generation backend: one full `gc.collect()` in this process (what `HFBackend.close`
  ran every time before round 7; now only when something still holds the model).

Round 8:

- the added tokens: `load_tokenizer` on a copy of the tokenizer files whose
  tokenizer_config.json has no `added_tokens_decoder` (as lidr converted the embedded model
  before round 8) against one that has it; ids compared;
- py3langid's model: its own loader (unpacks the LZMA file) against lidr's copy of the
  unpacked arrays in its cache (`lidr.langid._model_parts`); arrays compared;
- a full collection with a LoRA-wrapped model alive (as in a train stage): `gc.collect()`
  against the same where what was alive before the model is frozen (`libraries_frozen()`,
  what `lidr run` does for its stages);
- a finished row leaving the KV cache: transformers' `batch_select_indices` against
  `_keep_rows`, on a cache of the demo's size (32 rows, 200 positions, the model's layers);
  the kept rows compared.

Round 9:

- a decoding step's KV cache update: transformers' `DynamicLayer.update` (concatenates: the
  whole cache is copied) against the decoder's growing layers (`lidr.backends.decode._growing`:
  the new position written into spare room), on a cache of the demo's size (32 rows, 200
  positions, the model's layers), one step at a time; the returned states compared.

Round 10:

- the int8 copy of the output layer for a later backend (every iteration's model under LoRA has
  its first model's output layer): building it again (`Int8Head(w, h)`, what each backend did
  in round 9) against `Int8Head.of(w, h)` with the copy already built (a hash of the weight
  finds it: SHA-256 in rounds 10-11, XXH3-128 since round 12); the bounds of both copies
  compared on hidden states.

- new rows joining a running batch: the caches concatenated with their padding (`torch.cat`,
  what `_join` did before) against `_join` writing them once into a buffer with room, on the
  model's layers (56 running rows of 300 positions, 8 new rows of 280), each followed by the
  next decoding step's cache update (which had to copy the concatenated cache into a buffer);
  the states after the step compared.

Round 11:

- a generation backend's decoder set-up (`ContinuousDecoder(..., packed_weights=True)` on a
  loaded model): with the output layer packed for oneDNN at once (what it did before round
  11) against packed at its first full fp32 product, which the fp16 and int8 screens leave
  for rare steps; the greedy choices of both for a few hidden states compared.

Round 12:

- saving a trained model (a LoRA model merged with `merge_lora`, as the train stage saves
  it): `save_pretrained` in one file (what the train stage did before round 12) against
  `lidr.checkpoint.save_model` with the embedding, which LoRA leaves as loaded, linked from
  the converted model's own file instead of written; both folders' tensors compared.

Round 16:

- the train stage's model after the generation engine on the same M_t (its decoder packed the
  body's frozen layers for the forward at its set-up): the engine closed, M_t loaded again and
  both copies of its layers packed (what the train stage did before round 16) against the
  engine's model taken (`HFBackend.take_model`) and the backward's copies packed only
  (`packed_linear.pack` keeps a forward copy); every packed layer's output and input gradient
  compared on the same rows.

Round 20:

- the tokenizer file: `load_tokenizer` (as in a new process) on tokenizer.json as
  `save_pretrained` writes it (indented: how lidr converted the embedded model before round 20)
  against the same JSON written compact (`lidr.models._compact_tokenizer`); ids compared;
- a prefill group's chunks (32 rows in two chunks of 180 and 200 positions, the model's
  layers) written into caches of their own and joined by a copy (`_join` before round 20)
  against written into their rows of the group's buffers (`_JointBuffers`), where the join
  only zeroes the pads; the joined states compared;
- the next generation engine's model after a LoRA train stage (deltas of rank 16 on every
  linear layer): M_t+1 written (`save_with_deltas`) and loaded from those files in the run's
  dtype (before round 20) against written while each merged weight is copied into the model
  in memory (`save_with_deltas(..., on_merged=...)`, the train stage's `hand_over`); the
  weights compared.

Each pair runs alternately, `--rounds` times; the table gives the median.

    .venv/bin/python bench/fixed_costs.py              # about 2 minutes on 2 cores
    .venv/bin/python bench/fixed_costs.py --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each pair (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return p.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tokenizer_costs(model_dir: Path, rounds: int, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    import lidr.models as models

    def lidr_load():
        models._tokenizers.clear()  # as in a new process
        return models.load_tokenizer(model_dir)

    times: dict[str, list[float]] = {"plain": [], "lidr": []}
    same = True
    for _ in range(rounds):
        for name, fn in (("plain", lambda: AutoTokenizer.from_pretrained(model_dir)), ("lidr", lidr_load)):
            gc.collect()
            seconds, tok = timed(fn)
            times[name].append(seconds)
            if name == "plain":
                want = [tok(t).input_ids for t in texts]
            else:
                same = same and [tok(t).input_ids for t in texts] == want
            del tok
    return {k: statistics.median(v) for k, v in times.items()} | {"same_ids": same}


def lora_model(model_dir: Path):
    """The model with nonzero LoRA adapters on every linear layer (the same each time)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                       LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return m


def merge_costs(model_dir: Path, rounds: int) -> dict:
    import torch

    from lidr.pipeline.train import merge_lora

    times: dict[str, list[float]] = {"peft": [], "lidr": []}
    same = True
    for _ in range(rounds):
        merged = {}
        for name, fn in (("peft", lambda m: m.merge_and_unload()), ("lidr", merge_lora)):
            m = lora_model(model_dir)
            gc.collect()
            seconds, out = timed(lambda: fn(m))
            times[name].append(seconds)
            merged[name] = out.state_dict()
            del m, out
        same = same and all(torch.equal(merged["peft"][k], merged["lidr"][k]) for k in merged["peft"])
        del merged
    return {k: statistics.median(v) for k, v in times.items()} | {"same_weights": same}


def added_tokens_costs(model_dir: Path, rounds: int, texts: list[str]) -> dict:
    import json
    import shutil
    import tempfile

    import lidr.models as models

    root = Path(tempfile.mkdtemp(prefix="lidr-bench-"))
    folders = {}
    for name in ("without", "with"):
        folders[name] = root / name
        folders[name].mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copyfile(model_dir / f, folders[name] / f)
    config = json.loads((folders["without"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    (folders["without"] / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    models._record_added_tokens(folders["with"])
    times, ids = tokenizer_loads(folders, rounds, texts, root)
    return times | {"same_ids": ids["without"] == ids["with"]}


def tokenizer_loads(folders: dict[str, Path], rounds: int, texts: list[str], root: Path) -> tuple[dict, dict]:
    """`load_tokenizer` on each folder in turn, as in a new process, `rounds` times: the median
    seconds and the ids of `texts` for each; `root` (the folders' temp parent) is removed after."""
    import shutil

    import lidr.models as models

    times: dict[str, list[float]] = {name: [] for name in folders}
    ids = {}
    try:
        for _ in range(rounds):
            for name, folder in folders.items():
                models._tokenizers.clear()  # as in a new process
                gc.collect()
                seconds, tok = timed(lambda: models.load_tokenizer(folder))
                times[name].append(seconds)
                ids[name] = [tok(t).input_ids for t in texts]
                del tok
    finally:
        models._tokenizers.clear()
        shutil.rmtree(root, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()}, ids


def langid_costs(rounds: int) -> dict:
    import numpy as np
    from py3langid import modelio
    from py3langid.langid import MODEL_DIR, MODEL_FILE

    from lidr import langid

    langid._model_parts()  # writes lidr's cached copy if it is not there yet
    times: dict[str, list[float]] = {"py3langid": [], "lidr": []}
    parts = {}
    for _ in range(rounds):
        for name, fn in (("py3langid", lambda: modelio.load_model(MODEL_DIR / MODEL_FILE)), ("lidr", langid._model_parts)):
            seconds, parts[name] = timed(fn)
            times[name].append(seconds)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(parts["py3langid"], parts["lidr"]))
    return {k: statistics.median(v) for k, v in times.items()} | {"same_model": same}


def collect_costs(rounds: int, make_model) -> dict:
    """A full collection with a LoRA-wrapped model alive (as in a train stage), and the same with
    what was alive before the model frozen first (as `lidr run` freezes before its stages)."""
    from lidr.models import libraries_frozen

    plain, frozen = [], []
    tracked = len(gc.get_objects())
    for _ in range(max(rounds, 3)):
        model = make_model()
        plain.append(timed(gc.collect)[0])
        del model
        gc.collect()
        with libraries_frozen():
            model = make_model()
            frozen.append(timed(gc.collect)[0])
            del model
    return {"plain": statistics.median(plain), "frozen": statistics.median(frozen), "tracked": tracked}


def compaction_costs(model_dir: Path, rounds: int, rows: int = 32, length: int = 200) -> dict:
    import torch
    from transformers import AutoConfig, DynamicCache

    from lidr.backends.decode import _keep_rows

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    keys = [torch.randn(rows, text.num_key_value_heads, length, text.head_dim) for _ in range(text.num_hidden_layers)]

    def cache():
        c = DynamicCache(config=config)
        for i, k in enumerate(keys):
            c.update(k.clone(), k.clone(), i)
        return c

    keep = [i for i in range(rows) if i != rows // 5]  # one row of 32 ends
    times: dict[str, list[float]] = {"transformers": [], "lidr": []}
    same = True
    for _ in range(rounds):
        for name in times:
            for _ in range(5):  # five rows leave, one at a time
                c = cache()
                if name == "transformers":
                    seconds, _ = timed(lambda: c.batch_select_indices(torch.tensor(keep)))
                    order = keep
                else:
                    seconds, order = timed(lambda: _keep_rows(c, keep, True, torch.device("cpu")))
                times[name].append(seconds)
                same = same and sorted(order) == keep and all(
                    torch.equal(layer.keys, k[order]) and torch.equal(layer.values, k[order]) for layer, k in zip(c.layers, keys))
    return {k: statistics.median(v) for k, v in times.items()} | {"same_rows": same, "mb": sum(k.numel() * 8 for k in keys) / 1e6}


def append_costs(model_dir: Path, rounds: int, rows: int = 32, length: int = 200, steps: int = 8) -> dict:
    import torch
    from transformers import AutoConfig, DynamicCache

    from lidr.backends.decode import _growing

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    shape = (rows, text.num_key_value_heads, length, text.head_dim)
    prompt = [torch.randn(shape) for _ in range(text.num_hidden_layers)]
    new = [[torch.randn(rows, shape[1], 1, shape[3]) for _ in prompt] for _ in range(steps)]

    def run(cache) -> tuple[float, list]:
        for i, k in enumerate(prompt):
            cache.update(k, k, i)
        t0 = time.perf_counter()
        for step in new:
            out = [cache.update(k, k, i) for i, k in enumerate(step)]
        return (time.perf_counter() - t0) / steps, out

    times: dict[str, list[float]] = {"transformers": [], "lidr": []}
    same = True
    for _ in range(rounds):
        seconds, want = run(DynamicCache(config=config))
        times["transformers"].append(seconds)
        seconds, got = run(_growing(DynamicCache(config=config)))
        times["lidr"].append(seconds)
        same = same and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))
    return {k: statistics.median(v) for k, v in times.items()} | {"same_states": same}


def int8_copy_costs(model, rounds: int) -> dict:
    import torch

    from lidr.head import Int8Head

    if not Int8Head.available():
        return {"build": float("nan"), "reuse": float("nan"), "same_bounds": None}
    weight = model.get_output_embeddings().weight.detach()
    torch.manual_seed(0)
    h = torch.randn(8, weight.shape[1]) * 5
    times: dict[str, list[float]] = {"build": [], "reuse": []}
    same = True
    Int8Head.of(weight, h)  # the copy an earlier backend built
    for _ in range(rounds):
        seconds, built = timed(lambda: Int8Head(weight, h))
        times["build"].append(seconds)
        copy = weight.clone()  # the next model's output layer: the same bytes, another tensor
        seconds, kept = timed(lambda: Int8Head.of(copy, h))
        times["reuse"].append(seconds)
        same = same and torch.equal(built.upper(h)[0], kept.upper(h)[0])
        del built, copy
    Int8Head.forget()
    return {k: statistics.median(v) for k, v in times.items()} | {"same_bounds": same}


def join_costs(model_dir: Path, rounds: int, rows: int = 56, length: int = 300, new_rows: int = 8,
               new_length: int = 280) -> dict:
    import torch
    from transformers import AutoConfig, DynamicCache

    from lidr.backends.decode import _growing, _join

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    heads, dim = text.num_key_value_heads, text.head_dim

    def filled(n_rows, n):
        cache = _growing(DynamicCache(config=config))
        for i in range(text.num_hidden_layers):
            k = torch.randn(n_rows, heads, n, dim)
            cache.update(k, -k, i)
        return cache, torch.ones(n_rows, n, dtype=torch.long), torch.zeros(n_rows, n, dtype=torch.long)

    step = [torch.randn(rows + new_rows, heads, 1, dim) for _ in range(text.num_hidden_layers)]

    def concatenated(parts):  # the join before round 10: padded copies, concatenated
        cache = parts[0][0]
        for i, layer in enumerate(cache.layers):
            for name in ("keys", "values"):
                states = [getattr(c.layers[i], name) for c, _, _ in parts]
                padded = [torch.cat([t.new_zeros(*t.shape[:2], length - t.shape[2], t.shape[3]), t], 2) for t in states]
                setattr(layer, name, torch.cat(padded))
        return cache

    times: dict[str, list[float]] = {"cat": [], "lidr": []}
    same = True
    for _ in range(rounds):
        out = {}
        for name, join in (("cat", concatenated), ("lidr", lambda parts: _join(parts)[0])):
            torch.manual_seed(1)
            parts = [filled(rows, length), filled(new_rows, new_length)]
            t0 = time.perf_counter()
            cache = join(parts)
            out[name] = [cache.update(k, k, i) for i, k in enumerate(step)]
            times[name].append(time.perf_counter() - t0)
        same = same and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out["cat"], out["lidr"]))
    mb = 2 * text.num_hidden_layers * (rows + new_rows) * heads * length * dim * 4 / 1e6
    return {k: statistics.median(v) for k, v in times.items()} | {"same_states": same, "mb": mb}


def decoder_setup_costs(model, tokenizer, rounds: int) -> dict:
    import torch

    from lidr import packed_linear
    from lidr.backends.decode import ContinuousDecoder

    torch.manual_seed(0)
    h = torch.randn(3, model.config.get_text_config().hidden_size) * 5
    ContinuousDecoder(model, tokenizer, set(), packed_weights=True)  # the once-per-process costs (fp16 speed check)
    times: dict[str, list[float]] = {"eager": [], "lazy": []}
    choices = {}
    for _ in range(rounds):
        for name in ("eager", "lazy"):
            packed_linear.unpack(model)  # the layers as loaded, for the next set-up to pack
            t0 = time.perf_counter()
            decoder = ContinuousDecoder(model, tokenizer, set(), packed_weights=True)
            if name == "eager":
                decoder._packed_head()  # the output layer packed at once, as before round 11
            times[name].append(time.perf_counter() - t0)
            with torch.inference_mode():
                choices[name] = decoder._head(h).argmax(1)  # the full fp32 product: packs it now
            del decoder
    packed_linear.unpack(model)
    mb = model.get_output_embeddings().weight.numel() * 4 / 1e6
    return ({k: statistics.median(v) for k, v in times.items()}
            | {"same_choices": torch.equal(choices["eager"], choices["lazy"]), "mb": mb})


def save_costs(model_dir: Path, rounds: int) -> dict:
    import json
    import os
    import shutil
    import tempfile

    import torch
    from safetensors.torch import load_file

    from lidr.checkpoint import save_model, vocabulary_matrices
    from lidr.pipeline.train import merge_lora

    model = merge_lora(lora_model(model_dir))  # merged layers in new memory, the embedding as loaded
    as_loaded = list(vocabulary_matrices(model).values())  # LoRA left them as loaded
    times: dict[str, list[float]] = {"whole": [], "linked": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # where a run folder would be
        last: dict[str, Path] = {}
        for i in range(rounds):
            for name in ("whole", "linked"):
                if name in last:
                    shutil.rmtree(last[name])  # as a new save replaces a folder
                out = last[name] = Path(tmp) / f"{name}-{i}"
                gc.collect()
                t0 = time.perf_counter()
                if name == "whole":
                    model.save_pretrained(out, safe_serialization=True)
                else:
                    done = save_model(model, out, source=model_dir, as_loaded=as_loaded)
                times[name].append(time.perf_counter() - t0)
        whole = load_file(last["whole"] / "model.safetensors")
        files = set(json.loads((last["linked"] / "model.safetensors.index.json").read_text())["weight_map"].values())
        linked = {k: v for f in files for k, v in load_file(last["linked"] / f).items()}
        same = whole.keys() == linked.keys() and all(torch.equal(whole[k], linked[k]) for k in whole)
        embed = last["linked"] / "model-embed_tokens.safetensors"
        hard_link = embed.is_file() and os.path.samefile(embed, model_dir / "model-embed_tokens.safetensors")
    return {k: statistics.median(v) for k, v in times.items()} | {
        "same_tensors": same, "linked_names": done["linked"], "hard_link": hard_link,
        "mb_linked": sum(model.state_dict()[k].numel() * model.state_dict()[k].element_size() for k in done["linked"]) / 1e6}


def tokenizer_file_costs(model_dir: Path, rounds: int, texts: list[str]) -> dict:
    import json
    import shutil
    import tempfile

    import lidr.models as models

    root = Path(tempfile.mkdtemp(prefix="lidr-bench-"))
    content = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    folders = {}
    for name in ("indented", "compact"):
        folders[name] = root / name
        folders[name].mkdir()
        for f in ("tokenizer_config.json", "config.json"):
            shutil.copyfile(model_dir / f, folders[name] / f)
        # as save_pretrained writes it (the same bytes)
        (folders[name] / "tokenizer.json").write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    models._compact_tokenizer(folders["compact"])
    sizes = {name: (folder / "tokenizer.json").stat().st_size / 1e6 for name, folder in folders.items()}
    times, ids = tokenizer_loads(folders, rounds, texts, root)
    return times | {"same_ids": ids["indented"] == ids["compact"], "mb": sizes}


def prefill_join_costs(model_dir: Path, rounds: int, widths: tuple[int, ...] = (180, 200), rows: int = 16) -> dict:
    import torch
    from transformers import AutoConfig, DynamicCache

    from lidr.backends import decode

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    heads, dim, n_layers = text.num_key_value_heads, text.head_dim, text.num_hidden_layers
    states = [[torch.randn(rows, heads, w, dim) for _ in range(n_layers)] for w in widths]
    length = max(widths)

    def prefill(in_place: bool):
        joint = decode._JointBuffers(rows * len(widths), length) if in_place else None
        parts = []
        for c, w in enumerate(widths):
            cache = decode._growing(DynamicCache(config=config))
            if joint is not None:
                joint.place(cache, c * rows, w)
            for i, k in enumerate(states[c]):  # the chunk's forward writes its keys and values
                cache.update(k, -k, i)
            parts.append((cache, torch.ones(rows, w, dtype=torch.long), torch.zeros(rows, w, dtype=torch.long)))
        return decode._join(parts)[0]

    times: dict[str, list[float]] = {"copy": [], "in_place": []}
    same = True
    for _ in range(rounds):
        out = {}
        for name in ("copy", "in_place"):
            gc.collect()
            t0 = time.perf_counter()
            cache = prefill(name == "in_place")
            times[name].append(time.perf_counter() - t0)
            out[name] = [(layer.keys, layer.values) for layer in cache.layers]
        same = same and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out["copy"], out["in_place"]))
        del out, cache
    mb = 2 * n_layers * rows * len(widths) * heads * length * dim * 4 / 1e6
    return {k: statistics.median(v) for k, v in times.items()} | {"same_states": same, "mb": mb}


def handover_costs(model_dir: Path, rounds: int, rank: int = 16) -> dict:
    import shutil
    import tempfile

    import torch

    from lidr.checkpoint import LowRank, save_with_deltas
    from lidr.models import load_model, release_memory

    model = load_model(model_dir, dtype="auto", device="cpu")  # the trained model in memory, as training holds it
    weights = {name: p for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name}
    torch.manual_seed(0)
    deltas = {name: LowRank(tuple(p.shape), torch.randn(p.shape[0], rank) * 1e-2, torch.randn(rank, p.shape[1]) * 1e-2)
              for name, p in weights.items()}

    def copy_merged(name, merged):
        with torch.no_grad():
            weights[name].copy_(merged)

    times: dict[str, list[float]] = {"load": [], "handed": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # where a run folder would be
        for i in range(rounds):
            for name in ("load", "handed"):
                out = Path(tmp) / f"{name}-{i}"
                gc.collect()
                t0 = time.perf_counter()
                if name == "load":
                    save_with_deltas(model_dir, out, deltas)
                    loaded = load_model(out, dtype="auto", device="cpu")
                else:
                    save_with_deltas(model_dir, out, deltas, on_merged=copy_merged)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(out)  # as a run replaces its temporary folders
        mine, theirs = model.state_dict(), loaded.state_dict()
        same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    dtype = str(model.dtype).removeprefix("torch.")
    del model, loaded, mine, theirs
    release_memory()
    return {k: statistics.median(v) for k, v in times.items()} | {"same_weights": same, "dtype": dtype}


def take_costs(model_dir: Path, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lidr import packed_linear
    from lidr.backends.hf import HFBackend
    from lidr.models import release_memory

    times: dict[str, list[float]] = {"load": [], "take": []}
    results = {}
    for _ in range(rounds):
        for name in ("load", "take"):
            backend = HFBackend(model_dir, dtype="float32", device="cpu")  # as respond and translate leave it
            t0 = time.perf_counter()
            if name == "load":
                backend.close()
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
            else:
                model = backend.take_model()
            packed = packed_linear.pack(model, skip=(model.get_output_embeddings(),))
            times[name].append(time.perf_counter() - t0)
            torch.manual_seed(0)
            out = []
            for layer in (m for m in model.modules() if "_lidr_packed" in vars(m)):
                x = torch.randn(64, layer.in_features, requires_grad=True)
                y = layer(x)
                (grad,) = torch.autograd.grad(y.square().sum(), x)
                out += [y.detach(), grad]
            results[name] = (packed, out)
            packed_linear.unpack(model)
            del backend, model
            release_memory()
    same = results["load"][0] == results["take"][0] and all(
        torch.equal(a, b) for a, b in zip(results["load"][1], results["take"][1]))
    return {k: statistics.median(v) for k, v in times.items()} | {"same_outputs": same, "layers": results["take"][0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls a renamed transformers method
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.machine()
    common.print_machine(info)
    from lidr.models import resolve_model
    from lidr.templates import choose_format

    model_dir = resolve_model("gemma-3-270m")
    import lidr.models as models

    fmt = choose_format(models.load_tokenizer(model_dir), "auto", None)  # also warms the file cache
    texts = [prompt for _, prompt, _ in common.demo_items(fmt, 32)]

    tok = tokenizer_costs(model_dir, args.rounds, texts)
    added = added_tokens_costs(model_dir, args.rounds, texts)
    lid = langid_costs(args.rounds)
    merge = merge_costs(model_dir, args.rounds)
    collect = collect_costs(args.rounds, lambda: lora_model(model_dir))
    compaction = compaction_costs(model_dir, args.rounds)
    append = append_costs(model_dir, args.rounds)
    model = models.load_model(model_dir, dtype="float32", device="cpu").requires_grad_(False)  # as a backend loads it
    int8 = int8_copy_costs(model, args.rounds)
    join = join_costs(model_dir, args.rounds)
    setup = decoder_setup_costs(model, models.load_tokenizer(model_dir), args.rounds)
    del model
    save = save_costs(model_dir, args.rounds)
    take = take_costs(model_dir, args.rounds)
    tok_file = tokenizer_file_costs(model_dir, args.rounds, texts)
    prefill = prefill_join_costs(model_dir, args.rounds)
    handover = handover_costs(model_dir, args.rounds)
    tracked = collect["tracked"]

    def compared(cost, before, before_s, lidr, lidr_s, digits=2, ratio_digits=1):
        return [cost, before, round(before_s, digits), lidr, round(lidr_s, digits),
                f"{before_s / lidr_s:.{ratio_digits}f}x"]

    rows = [
        compared("tokenizer", "AutoTokenizer.from_pretrained", tok["plain"], "load_tokenizer (gc paused)", tok["lidr"],
                 ratio_digits=2),
        compared("LoRA merge", "PEFT merge_and_unload", merge["peft"], "merge_lora", merge["lidr"], ratio_digits=2),
        ["backend close", "gc.collect()", round(collect["plain"], 2), "none (model freed by refcount)", 0.0, "-"],
        compared("added tokens", "load_tokenizer, config without them", added["without"], "load_tokenizer, listed",
                 added["with"], ratio_digits=2),
        compared("langid model", "py3langid (LZMA)", lid["py3langid"], "lidr's unpacked copy", lid["lidr"],
                 ratio_digits=2),
        compared("full collection", "gc.collect(), LoRA model alive", collect["plain"], "the same, libraries frozen",
                 collect["frozen"], digits=3),
        compared("row leaves cache", "batch_select_indices", compaction["transformers"], "_keep_rows",
                 compaction["lidr"], digits=4),
        compared("step's cache update", "DynamicLayer (concatenates)", append["transformers"], "growing layers",
                 append["lidr"], digits=4),
        compared("int8 output layer", "Int8Head built again", int8["build"], "Int8Head.of (kept copy)", int8["reuse"]),
        compared("rows join + a step", "torch.cat of padded caches", join["cat"], "_join into a buffer", join["lidr"],
                 digits=3),
        compared("decoder set-up", "output layer packed at once", setup["eager"], "packed at its first use",
                 setup["lazy"]),
        compared("trained model save", "save_pretrained, one file", save["whole"],
                 "save_model, embedding " + ("hard-linked" if save["hard_link"] else "copied"), save["linked"]),
        compared("train stage's model", "engine closed, M_t loaded, packed", take["load"],
                 "the engine's taken, backward packed", take["take"]),
        compared("tokenizer file", f"indented ({tok_file['mb']['indented']:.0f} MB)", tok_file["indented"],
                 f"compact ({tok_file['mb']['compact']:.0f} MB)", tok_file["compact"], ratio_digits=2),
        compared("prefill chunks join", "own caches, joined by a copy", prefill["copy"],
                 "written in place (_JointBuffers)", prefill["in_place"], digits=3),
        compared("next engine's model", f"M_t+1 saved, loaded ({handover['dtype']})", handover["load"],
                 "saved, merge copied in (hand_over)", handover["handed"], ratio_digits=2),
    ]
    print(f"medians of {args.rounds} alternating rounds; {tracked} objects tracked by gc in this process")
    print(common.table(["cost", "before", "s", "lidr", "s", "ratio"], rows))
    print(f"same ids on {len(texts)} demo prompts: {tok['same_ids']} (added tokens listed or not: {added['same_ids']}); "
          f"same merged weights: {merge['same_weights']}; same langid model: {lid['same_model']}; "
          f"same rows left in the {compaction['mb']:.0f} MB cache: {compaction['same_rows']}; "
          f"same states after a step: {append['same_states']}; same int8 bounds: {int8['same_bounds']}; "
          f"same states after a join and a step ({join['mb']:.0f} MB cache): {join['same_states']}; "
          f"same choices of the output layer packed at once or later ({setup['mb']:.0f} MB not packed until "
          f"needed): {setup['same_choices']}; same tensors saved whole or with {', '.join(save['linked_names']) or 'nothing'} "
          f"({save['mb_linked']:.0f} MB) linked: {save['same_tensors']}; same outputs and input gradients of the "
          f"{take['layers']} packed layers loaded or taken: {take['same_outputs']}; same ids from the indented or "
          f"compact tokenizer file: {tok_file['same_ids']}; same states after the prefill's join "
          f"({prefill['mb']:.0f} MB cache): {prefill['same_states']}; same weights loaded or handed over: "
          f"{handover['same_weights']}")
    print(common.keyvals({
        "tokenizer_plain_s": round(tok["plain"], 3), "tokenizer_lidr_s": round(tok["lidr"], 3), "merge_peft_s": round(merge["peft"], 3),
        "merge_lidr_s": round(merge["lidr"], 3), "gc_collect_s": round(collect["plain"], 3),
        "gc_collect_frozen_s": round(collect["frozen"], 3), "tokenizer_unlisted_s": round(added["without"], 3),
        "tokenizer_listed_s": round(added["with"], 3), "langid_lzma_s": round(lid["py3langid"], 3),
        "langid_cached_s": round(lid["lidr"], 3), "row_leaves_transformers_s": round(compaction["transformers"], 4),
        "row_leaves_lidr_s": round(compaction["lidr"], 4), "cache_step_transformers_s": round(append["transformers"], 4),
        "cache_step_lidr_s": round(append["lidr"], 4), "int8_build_s": round(int8["build"], 3),
        "int8_reuse_s": round(int8["reuse"], 3), "join_cat_s": round(join["cat"], 4), "join_lidr_s": round(join["lidr"], 4),
        "setup_eager_head_s": round(setup["eager"], 3), "setup_lazy_head_s": round(setup["lazy"], 3),
        "same_ids": tok["same_ids"] and added["same_ids"], "same_weights": merge["same_weights"],
        "same_langid": lid["same_model"], "same_rows": compaction["same_rows"], "same_states": append["same_states"],
        "same_int8_bounds": int8["same_bounds"], "same_join_states": join["same_states"],
        "same_setup_choices": setup["same_choices"], "save_whole_s": round(save["whole"], 3),
        "save_linked_s": round(save["linked"], 3), "save_hard_link": save["hard_link"],
        "same_saved_tensors": save["same_tensors"], "train_model_load_s": round(take["load"], 3),
        "train_model_take_s": round(take["take"], 3), "same_taken_outputs": take["same_outputs"],
        "tokenizer_indented_s": round(tok_file["indented"], 3), "tokenizer_compact_s": round(tok_file["compact"], 3),
        "same_tokenizer_file_ids": tok_file["same_ids"], "prefill_join_copy_s": round(prefill["copy"], 4),
        "prefill_join_in_place_s": round(prefill["in_place"], 4), "same_prefill_states": prefill["same_states"],
        "next_model_load_s": round(handover["load"], 3), "next_model_handed_s": round(handover["handed"], 3),
        "same_handed_weights": handover["same_weights"],
        "rounds": args.rounds,
    }))


if __name__ == "__main__":
    main()
