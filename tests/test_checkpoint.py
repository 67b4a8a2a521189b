"""Saved model folders: the vocabulary matrices in files of their own, linked from the model
trained from when training left them as they were (lidr/checkpoint.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lidr.checkpoint import save_model, vocabulary_matrices
from lidr.config import LoraConfig, TrainingConfig
from lidr.pipeline.train import train_dpo_nll
from tiny import save_tiny_gemma3

WORDS = "<s> Question : hola mundo gracias one two three four the cat sat on mat Answer".split()
EXAMPLES = [
    {"prompt": "<s>Question : hola mundo Answer :", "chosen": " hola mundo gracias</s>", "rejected": " the cat</s>"},
    {"prompt": "<s>Question : one two Answer :", "chosen": " three four</s>", "rejected": " mat mat mat</s>"},
]
EMBED = "model.embed_tokens.weight"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny"), WORDS, vocab_size=64, hidden_size=32,
                            intermediate_size=64, num_attention_heads=2, sliding_window=32,
                            max_position_embeddings=128)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _state(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _load(path).state_dict().items()}


def _cfg(**kw) -> TrainingConfig:
    base = dict(beta=0.5, nll_weight=1.0, learning_rate=1e-2, epochs=1, batch_size=2, warmup_ratio=0.0,
                max_length=64, lora=LoraConfig(r=2, alpha=4), dtype="float32")
    return TrainingConfig(**(base | kw))


def _index(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_saved_folder_loads_back_with_the_embedding_in_a_file_of_its_own(tiny, tmp_path):
    model = _load(tiny)
    assert list(vocabulary_matrices(model)) == [EMBED]  # Gemma ties the output layer: one matrix
    done = save_model(model, tmp_path / "m")
    assert done == {"linked": [], "written": [EMBED]}
    files = _index(tmp_path / "m")
    assert files[EMBED] == "model-embed_tokens.safetensors"
    assert set(files.values()) == {"model-body.safetensors", "model-embed_tokens.safetensors"}
    assert not (tmp_path / "m" / "model.safetensors").exists()
    want, got = model.state_dict(), _state(tmp_path / "m")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    reloaded = _load(tmp_path / "m")  # still tied
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_an_untied_output_layer_gets_a_file_of_its_own_too(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    config = _load(tiny).config
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    done = save_model(model, tmp_path / "m")
    assert sorted(done["written"]) == sorted([EMBED, "lm_head.weight"])
    assert _index(tmp_path / "m")["lm_head.weight"] == "model-lm_head.safetensors"
    want, got = model.state_dict(), _state(tmp_path / "m")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_lora_iterations_link_the_embedding_instead_of_writing_it(tiny, tmp_path):
    """M0 (one safetensors file: nothing to link) -> M1 writes its embedding file; M1 -> M2
    links M1's. Both load with M0's embedding and their own trained layers."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    s1 = train_dpo_nll(tiny, EXAMPLES, m1, _cfg(), seed=0, log_dir=tmp_path / "log1")
    assert s1["save_linked"] == [] and s1["save_written"] == [EMBED]
    s2 = train_dpo_nll(m1, EXAMPLES, m2, _cfg(), seed=0, log_dir=tmp_path / "log2")
    assert s2["save_linked"] == [EMBED] and s2["save_written"] == []
    assert os.path.samefile(m2 / "model-embed_tokens.safetensors", m1 / "model-embed_tokens.safetensors")
    base, one, two = _state(tiny), _state(m1), _state(m2)
    assert torch.equal(two[EMBED], base[EMBED]) and torch.equal(one[EMBED], base[EMBED])
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(one[up], base[up]) and not torch.equal(two[up], one[up])
    # training M2 again replaces M2's folder; M1's file (the same inode) is untouched
    before = (m1 / "model-embed_tokens.safetensors").read_bytes()
    train_dpo_nll(m1, EXAMPLES, m2, _cfg(), seed=1, log_dir=tmp_path / "log3")
    assert (m1 / "model-embed_tokens.safetensors").read_bytes() == before
    # and so does transformers saving another model into M2's folder: it writes files of other names
    other = _load(tiny)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    other.save_pretrained(m2)
    assert (m1 / "model-embed_tokens.safetensors").read_bytes() == before
    assert torch.equal(_state(m2)[EMBED], 2 * base[EMBED]) and torch.equal(_state(m1)[EMBED], base[EMBED])


def test_lora_on_the_tied_output_layer_writes_the_embedding(tiny, tmp_path):
    """A LoRA on lm_head merges into the tied embedding: it changed, so it is written."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    train_dpo_nll(tiny, EXAMPLES, m1, _cfg(), seed=0, log_dir=tmp_path / "log1")
    cfg = _cfg(lora=LoraConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"]))
    s2 = train_dpo_nll(m1, EXAMPLES, m2, cfg, seed=0, log_dir=tmp_path / "log2")
    assert s2["save_linked"] == [] and s2["save_written"] == [EMBED]
    assert not os.path.samefile(m2 / "model-embed_tokens.safetensors", m1 / "model-embed_tokens.safetensors")
    assert not torch.equal(_state(m2)[EMBED], _state(m1)[EMBED])


def test_a_source_file_that_differs_is_not_linked(tiny, tmp_path):
    """The caller's word that a matrix is unchanged is checked against the file: another dtype,
    other bytes, or a file holding more than the matrix means writing it."""
    model = _load(tiny)
    save_model(model, tmp_path / "src")
    # other bytes in the source's file (its last rows)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "src", bad)
    from safetensors.torch import load_file, save_file

    t = load_file(bad / "model-embed_tokens.safetensors")
    t[EMBED][-1] += 1
    save_file(t, bad / "model-embed_tokens.safetensors", metadata={"format": "pt"})
    loaded = [model.model.embed_tokens.weight]
    assert save_model(model, tmp_path / "a", source=bad, as_loaded=loaded)["written"] == [EMBED]
    # the source keeps the matrix with other tensors (one safetensors file): nothing to link
    assert save_model(model, tmp_path / "b", source=tiny, as_loaded=loaded)["written"] == [EMBED]
    # the same file, but the model's matrix is now bf16
    half = _load(tiny).to(torch.bfloat16)
    assert save_model(half, tmp_path / "c", source=tmp_path / "src",
                      as_loaded=[half.model.embed_tokens.weight])["written"] == [EMBED]
    # and the good case: linked, the same file
    assert save_model(model, tmp_path / "d", source=tmp_path / "src", as_loaded=loaded)["linked"] == [EMBED]
    # a tensor the caller does not vouch for is written, even with the same bytes
    assert save_model(model, tmp_path / "e", source=tmp_path / "src",
                      as_loaded=[model.model.embed_tokens.weight.clone()])["written"] == [EMBED]
    assert os.path.samefile(tmp_path / "d" / "model-embed_tokens.safetensors",
                            tmp_path / "src" / "model-embed_tokens.safetensors")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second file system (/dev/shm)")
def test_across_file_systems_the_matrix_is_copied(tiny, tmp_path):
    import tempfile

    model = _load(tiny)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src = Path(shm) / "src"
        save_model(model, src)
        if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        assert save_model(model, tmp_path / "m", source=src,
                          as_loaded=[model.model.embed_tokens.weight])["linked"] == [EMBED]
        out = tmp_path / "m" / "model-embed_tokens.safetensors"
        assert not os.path.samefile(out, src / "model-embed_tokens.safetensors")
        assert out.read_bytes() == (src / "model-embed_tokens.safetensors").read_bytes()
    assert torch.equal(_state(tmp_path / "m")[EMBED], model.state_dict()[EMBED])


def _files(folder):
    from safetensors.torch import load_file

    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def _low_rank(shape, rank, generator, scale=0.5):
    from lidr.checkpoint import LowRank

    return LowRank(tuple(shape), torch.randn(shape[0], rank, generator=generator) * 1e-2 * scale,
                   torch.randn(rank, shape[1], generator=generator) * 1e-2)


def test_save_with_deltas_adds_in_the_stored_dtype_and_links_the_rest(tiny, tmp_path):
    """A folder's files again with low-rank changes added to named tensors: computed in fp32 and
    rounded once to the dtype each is stored in (bf16 here), the other tensors' bits kept, files
    without a change linked, and a change the folder has no tensor (or shape) for refused before
    anything is written."""
    from lidr.checkpoint import save_with_deltas

    src = tmp_path / "src"
    save_model(_load(tiny).bfloat16(), src)  # bf16 files, the embedding in a file of its own
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
    before = _files(src)
    g = torch.Generator().manual_seed(0)
    deltas = {n: _low_rank(before[n].shape, 3, g) for n in (up, down)}
    done = save_with_deltas(src, tmp_path / "out", deltas)
    assert done["linked"] == [EMBED] and up in done["written"]
    assert os.path.samefile(tmp_path / "out" / "model-embed_tokens.safetensors", src / "model-embed_tokens.safetensors")
    after = _files(tmp_path / "out")
    assert after.keys() == before.keys()
    for name, w in after.items():
        if name not in deltas:
            assert torch.equal(w, before[name]), name
            continue
        d = deltas[name]
        once = torch.addmm(before[name].float(), d.up, d.down).bfloat16()  # rounded once
        twice = (before[name].float() + (d.up @ d.down).bfloat16().float()).bfloat16()  # the change rounded first
        assert w.dtype == torch.bfloat16 and torch.equal(w, once) and not torch.equal(w, before[name]), name
        assert not torch.equal(once, twice)  # (so the check above can tell them apart)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.model.layers[0].mlp.up_proj.weight, after[up])
    wrong = deltas[up]._replace(shape=deltas[up].shape[::-1], up=deltas[up].down.T, down=deltas[up].up.T)
    for bad in ({"model.layers.9.mlp.up_proj.weight": deltas[up]}, {up: wrong}):
        with pytest.raises(KeyError):
            save_with_deltas(src, tmp_path / "bad", bad)
        assert not (tmp_path / "bad").exists()


def test_fp32_weights_get_their_low_rank_change_in_fp32(tiny, tmp_path, monkeypatch):
    """fp32 files: each changed tensor is W + up @ down to fp32 rounding, the change
    really there; unchanged tensors (copied in many pieces here) keep their bits and the files
    their sizes."""
    import lidr.checkpoint as checkpoint
    from lidr.checkpoint import save_with_deltas

    src = tmp_path / "src"
    save_model(_load(tiny), src)
    before = _files(src)
    g = torch.Generator().manual_seed(0)
    low = {n: _low_rank(before[n].shape, 4, g) for n in ["model.layers.0.self_attn.q_proj.weight",
                                                          "model.layers.1.mlp.down_proj.weight"]}
    monkeypatch.setattr(checkpoint, "_COPY_CHUNK", 1000)  # unchanged tensors copied in many pieces
    save_with_deltas(src, tmp_path / "out", low)
    assert [f.stat().st_size for f in sorted((tmp_path / "out").glob("*.safetensors"))] == \
        [f.stat().st_size for f in sorted(src.glob("*.safetensors"))]
    for name, w in _files(tmp_path / "out").items():
        assert w.dtype == torch.float32, name
        if name not in low:
            assert torch.equal(w, before[name]), name
            continue
        want = before[name] + low[name].up @ low[name].down
        assert (want - before[name]).abs().max() > 1e-5  # the change is there
        assert torch.allclose(w, want, rtol=0, atol=1e-6), name


def test_a_source_file_shorter_than_its_header_says_is_named(tiny, tmp_path):
    """A model file cut short (a copy that stopped early) is an error naming it, not a short save."""
    from lidr.checkpoint import LowRank, save_with_deltas

    src = tmp_path / "src"
    save_model(_load(tiny), src)
    body = next(f for f in src.glob("*.safetensors") if "embed" not in f.name)
    body.write_bytes(body.read_bytes()[:-64])  # a copy cut short
    name = "model.layers.1.mlp.down_proj.weight"
    shape = tuple(_load(tiny).get_parameter(name).shape)
    delta = LowRank(shape, torch.zeros(shape[0], 2), torch.zeros(2, shape[1]))
    with pytest.raises(ValueError, match=str(body)):
        save_with_deltas(src, tmp_path / "out", {name: delta})
