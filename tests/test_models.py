"""lidr/models.py's tokenizer loading (built with garbage collection paused, once per process
for the same files; the added tokens listed in a converted model's tokenizer_config.json), the
libraries frozen during `lidr run`, and the LoRA merge written to new memory
(lidr/pipeline/train.py `merge_lora`), each against what transformers / PEFT give."""

from __future__ import annotations

import gc
import os
import shutil

import pytest
import torch

import lidr.models as models
from lidr.models import load_tokenizer

from tiny import save_tiny_gemma3, word_tokenizer


@pytest.fixture
def fresh(monkeypatch):
    """No tokenizer held in this process yet."""
    monkeypatch.setattr(models, "_tokenizers", {})
    monkeypatch.setattr(models, "_tokenizer_digests", {})


def _gc_state_inside(monkeypatch, cls) -> list[bool]:
    """Record, at each call of `cls.from_pretrained`, whether automatic collection is on."""
    seen: list[bool] = []
    original = cls.from_pretrained.__func__

    def recording(klass, *args, **kwargs):
        seen.append(gc.isenabled())
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    return seen


def test_tokenizer_built_with_gc_paused_leaves_gc_as_it_was(fresh, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    word_tokenizer("the cat sat".split()).save_pretrained(folder)
    seen = _gc_state_inside(monkeypatch, AutoTokenizer)
    assert gc.isenabled()
    assert load_tokenizer(folder)("the cat").input_ids == word_tokenizer("the cat sat".split())("the cat").input_ids
    assert seen == [False] and gc.isenabled()  # paused for the build only
    models._tokenizers.clear()
    gc.disable()  # a caller that turned it off keeps it off
    try:
        load_tokenizer(folder)
        assert not gc.isenabled()
    finally:
        gc.enable()
    models._tokenizers.clear()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):  # and a failed build turns it back on
        load_tokenizer(tmp_path / "empty")
    assert gc.isenabled()


def test_model_loaded_with_gc_paused_leaves_gc_as_it_was(tiny_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = _gc_state_inside(monkeypatch, AutoModelForCausalLM)
    model = models.load_model(tiny_path, dtype="float32", device="cpu")
    assert seen == [False] and gc.isenabled()
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training


def test_same_tokenizer_files_share_one_tokenizer_until_they_change(fresh, tmp_path):
    a, b = tmp_path / "m0", tmp_path / "m1"
    word_tokenizer("the cat sat on a mat".split()).save_pretrained(a)
    shutil.copytree(a, b)  # M1 beside M0: the same files
    first = load_tokenizer(a)
    assert load_tokenizer(b) is first
    assert first("the dog").input_ids[1] == 3  # "dog" is unknown (<unk> = 3)
    # rewritten in place (another tokenizer saved into the same folder): built again
    shutil.rmtree(b)
    word_tokenizer("the dog sat on a mat".split()).save_pretrained(b)
    os.utime(b / "tokenizer.json", ns=(1, 1))  # even with an odd mtime: the size differs, or the digest
    second = load_tokenizer(b)
    assert second is not first and 3 not in second("the dog").input_ids


def test_recorded_added_tokens_load_the_same_tokenizer(fresh, tmp_path):
    """The embedded model's real tokenizer, from a folder converted without the added-token
    list in tokenizer_config.json (as before) and with it: the same tokenizer."""
    import json

    from lidr.models import _record_added_tokens, resolve_model

    source = resolve_model("gemma-3-270m")
    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copyfile(source / name, folder / name)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("added_tokens_decoder", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _record_added_tokens(after)
    listed = json.loads((after / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    added = json.loads((after / "tokenizer.json").read_text())["added_tokens"]
    assert len(listed) == len(added) > 6000 and listed["105"]["content"] == "<start_of_turn>"
    stamp = (after / "tokenizer_config.json").stat().st_mtime_ns
    _record_added_tokens(after)  # already there: left alone
    assert (after / "tokenizer_config.json").stat().st_mtime_ns == stamp

    _assert_same_tokenizer(load_tokenizer(after), load_tokenizer(before))


def _assert_same_tokenizer(new, old) -> None:
    """Two loads of Gemma 3's tokenizer encode and decode alike (special and added tokens,
    white space, several scripts, emoji, a byte-fallback character) and list the same added
    tokens with the same flags."""
    assert new is not old
    texts = ["Hello world", "  two  spaces\n\nand lines\t", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model",
             "<bos>x<eos><pad><mask>", "Ünïcödé, Привет, 数学の問題: 3+4=?", "🙂 emoji 𓀀", "<unused42> [multimodal]"]
    for text in texts:
        for special in (True, False):
            ids = new(text, add_special_tokens=special).input_ids
            assert ids == old(text, add_special_tokens=special).input_ids
            for skip in (True, False):
                assert new.decode(ids, skip_special_tokens=skip) == old.decode(ids, skip_special_tokens=skip)
    # each added token with its flags (special, normalized, lstrip, ...)
    assert {i: repr(t) for i, t in new.added_tokens_decoder.items()} == {i: repr(t) for i, t in old.added_tokens_decoder.items()}
    assert new.all_special_tokens == old.all_special_tokens and len(new) == len(old)
    assert new.get_vocab() == old.get_vocab() and type(new) is type(old)


def test_compacted_tokenizer_file_loads_the_same_tokenizer(fresh, tmp_path):
    """The embedded model's real tokenizer.json as `save_pretrained` writes it (indented) and
    compacted by `_compact_tokenizer`: a smaller file, the same JSON, the same tokenizer; a
    compact file is left as it is."""
    import json

    from lidr.models import _compact_tokenizer, resolve_model

    source = resolve_model("gemma-3-270m")
    content = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
        for name in ("tokenizer_config.json", "config.json"):
            shutil.copyfile(source / name, folder / name)
        (folder / "tokenizer.json").write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    _compact_tokenizer(after)
    size = (after / "tokenizer.json").stat().st_size
    assert size < 0.6 * (before / "tokenizer.json").stat().st_size
    assert json.loads((after / "tokenizer.json").read_text(encoding="utf-8")) == content
    stamp = (after / "tokenizer.json").stat().st_mtime_ns
    _compact_tokenizer(after)  # compact already: left alone
    assert (after / "tokenizer.json").stat().st_mtime_ns == stamp

    _assert_same_tokenizer(load_tokenizer(after), load_tokenizer(before))


def test_libraries_stay_frozen_for_the_block_only():
    """`lidr run` freezes what is alive after the imports (gc skips it) and gives it back to the
    collector when the run ends; garbage made inside is still collected, and a freeze made by
    someone else is left alone."""
    import sys
    import weakref

    assert gc.get_freeze_count() == 0

    class Node:
        pass

    with pytest.raises(RuntimeError):
        with models.libraries_frozen():
            assert gc.get_freeze_count() > 100_000 and "transformers.modeling_utils" in sys.modules
            cycle = Node()
            cycle.me = cycle
            ref = weakref.ref(cycle)
            del cycle
            gc.collect()
            assert ref() is None
            raise RuntimeError("a stage failed")
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        # Frozen objects can still be freed by their reference count, so the count may only
        # fall a little; a second freeze would take in these 10k new objects, an unfreeze all.
        frozen = gc.get_freeze_count()
        made_after = [Node() for _ in range(10_000)]
        with models.libraries_frozen():
            assert frozen - 1000 < gc.get_freeze_count() <= frozen
        assert frozen - 1000 < gc.get_freeze_count() <= frozen
        del made_after
    finally:
        gc.unfreeze()


# -- merge_lora ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    words = "the cat sat on a mat and the dog ran".split()
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny") / "m", words, vocab_size=32, hidden_size=64,
                            intermediate_size=96, num_attention_heads=2, sliding_window=8, max_position_embeddings=64)


def _merged(path, how: str, dtype=torch.float32, **lora) -> tuple[dict, bool, str]:
    """The model at `path` with LoRA adapters (`lora`: LoraConfig arguments; nonzero, the same
    for the same arguments), merged by PEFT (`how="peft"`) or by merge_lora: its weights, whether
    its output layer is still its input embedding, its class name."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lidr.pipeline.train import merge_lora

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about adapting a tied layer
        # loaded from the file (memory-mapped for float32, as in training)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                               LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    out = model.merge_and_unload() if how == "peft" else merge_lora(model)
    tied = out.get_output_embeddings().weight is out.get_input_embeddings().weight
    return {k: v.clone() for k, v in out.state_dict().items()}, tied, type(out).__name__


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_lora_gives_peft_merge_and_unload_bit_for_bit(tiny_path, dtype):
    from transformers import AutoModelForCausalLM

    peft, peft_tied, _ = _merged(tiny_path, "peft", dtype, target_modules="all-linear")
    lidr, lidr_tied, cls = _merged(tiny_path, "lidr", dtype, target_modules="all-linear")
    assert cls == "Gemma3ForCausalLM" and lidr_tied and peft_tied
    assert _same(lidr, peft) and all(v.dtype == dtype for v in lidr.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=dtype).state_dict()
    changed = [k for k in base if not torch.equal(base[k], lidr[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # the adapters' layers, merged


def test_merge_lora_leaves_other_lora_kinds_to_peft(tiny_path):
    lora = dict(target_modules=["q_proj", "v_proj"], use_dora=True)
    assert _same(_merged(tiny_path, "lidr", **lora)[0], _merged(tiny_path, "peft", **lora)[0])


def test_merge_lora_leaves_a_tied_weight_to_peft(tiny_path):
    """LoRA on the output layer of a model whose output layer is its input embedding: PEFT's
    in-place merge changes both, and so must this."""
    lora = dict(target_modules=["lm_head", "q_proj"])
    lidr, lidr_tied, _ = _merged(tiny_path, "lidr", **lora)
    peft, peft_tied, _ = _merged(tiny_path, "peft", **lora)
    assert _same(lidr, peft) and lidr_tied == peft_tied


def test_copied_tokenizer_files_are_known_without_hashing_them_again(fresh, tmp_path, monkeypatch):
    """A trained model's folder gets the tokenizer files copied (`copy_tokenizer`) and is then
    renamed into place; loading its tokenizer hands back the one already built, without reading
    the files again. Files that changed since are read, and make another tokenizer."""
    from lidr.models import copy_tokenizer

    words = "the cat sat on a mat".split()
    src = tmp_path / "m0"
    word_tokenizer(words).save_pretrained(src)
    tok = load_tokenizer(src)
    assert copy_tokenizer(src, tmp_path / ".m1.tmp")
    (tmp_path / ".m1.tmp").rename(tmp_path / "m1")
    read = []
    real = models.file_digest
    monkeypatch.setattr(models, "file_digest", lambda path: read.append(path.name) or real(path))
    assert load_tokenizer(tmp_path / "m1") is tok and read == []
    # another tokenizer written over the copy: hashed, and built anew
    word_tokenizer(words + ["dog"]).save_pretrained(tmp_path / "m1")
    other = load_tokenizer(tmp_path / "m1")
    assert other is not tok and "tokenizer.json" in read
    assert other("dog").input_ids != tok("dog").input_ids


def test_output_layer_gets_standard_strides_on_cpu(tiny_path):
    """transformers hands the output layer the kept positions (`logits_to_keep=1`) as a strided
    view, which torch multiplies through a copy of the whole weight (0.8 s for gemma-3-270m in
    bf16); a model lidr loads on a CPU gives its output layer a copy of those rows instead, with
    the same logits."""
    model = models.load_model(tiny_path, dtype="bfloat16", device="cpu")
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.inference_mode():
        last = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        every = model(input_ids=ids).logits[:, -1]
    hidden = model.config.get_text_config().hidden_size
    assert seen[0] == (hidden, hidden, 1)  # [2, 1, hidden] in standard strides, not a view of [2, 4, hidden]
    assert torch.equal(last, every)


def test_models_load_and_train_without_the_hubs_kernels(tiny_path, tmp_path, monkeypatch):
    """transformers 5 (with the `kernels` package it requires) swaps layers for compiled kernels
    downloaded from the Hub, at load and at every `.train()` / `.eval()` that changes the mode:
    code no one asked for, and on a GPU node without internet the first `.train()` raised
    (an H200, transformers 5.25: tests/test_cuda.py). lidr's loads, generation's and training's,
    ask for none: `kernelize` is never called (here, where a plain load does call it)."""
    pytest.importorskip("kernels")
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    from lidr.config import TrainingConfig
    from lidr.pipeline.train import train_dpo_nll

    calls = []
    monkeypatch.setattr(modeling_utils, "kernelize", lambda model, **kw: calls.append(type(model).__name__))
    AutoModelForCausalLM.from_pretrained(tiny_path)
    if not calls:
        pytest.skip("this transformers does not use the Hub's kernels by default")
    calls.clear()
    model = models.load_model(tiny_path, dtype="float32", device="cpu")
    model.train()
    model.eval()
    examples = [{"prompt": "<s>the cat", "chosen": " sat on a mat</s>", "rejected": " ran</s>"}] * 2
    train_dpo_nll(tiny_path, examples, tmp_path / "m1", TrainingConfig(dtype="float32", batch_size=2, max_length=32),
                  seed=0, log_dir=tmp_path / "log")
    assert calls == []


def test_gpu_attention_leaves_cudnn_out_on_a_gpu_only():
    """`gpu_attention` turns torch's cuDNN attention off for a CUDA device (flash, memory-efficient
    and math stay on) and back after; for any other device it changes nothing."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with models.gpu_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with models.gpu_attention("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
