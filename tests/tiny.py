"""Tiny models for tests, built here (no Hub): a word-level tokenizer over a test's words, and
a random 2-layer Gemma 3 with logit soft-capping saved with it."""

from __future__ import annotations

import torch


def word_tokenizer(words: list[str], join_with_spaces: bool = False):
    """A fast tokenizer with one token per word of `words` (split on whitespace and punctuation)
    and <pad>, <s>, </s>, <unk> as ids 0-3. `join_with_spaces`: decoding puts spaces between
    words (by default it concatenates them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if join_with_spaces:
        tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_gemma3(path, words: list[str], vocab_size: int, hidden_size: int, intermediate_size: int,
                     num_attention_heads: int, sliding_window: int, max_position_embeddings: int):
    """A random 2-layer Gemma 3 (seed 0; logit soft-capping 30, head_dim 16, one KV head) and
    `word_tokenizer(words)`, saved together to `path`. Returns `path`."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    fast = word_tokenizer(words)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=num_attention_heads, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=max_position_embeddings, sliding_window=sliding_window,
        final_logit_softcapping=30.0, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path
