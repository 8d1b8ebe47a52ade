"""Tiny random causal LMs built in-process, for tests and for trying a federation without a download.

`load_model("tiny-llama")` / `load_model("tiny-gpt2")` come here: a 2-layer Llama with a byte-level
ChatML tokenizer and a 2-layer GPT-2 with a character tokenizer and no chat template, so tests cover
two different tokenizers and both prompt formats. Seeded: every build gives the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from participant.models import LocalModel

TINY_SEED = 1234
# Wider than the usual 0.02 so that a random model's greedy answers differ from prompt to prompt.
TINY_INIT_STD = 0.3
# Chat markup for the tiny Llama, in the same ChatML shape SmolLM2 uses.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The tiny GPT-2 reads characters from this alphabet; anything else becomes <unk>.
TINY_ALPHABET = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def build_tiny(spec: str, dtype: torch.dtype) -> LocalModel:
    """The tiny model `spec` names ("tiny-llama" or "tiny-gpt2"), in `dtype`, on the CPU."""
    tokenizer = _byte_level_chat_tokenizer() if spec == "tiny-llama" else _character_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model: Any = _tiny_llama(tokenizer) if spec == "tiny-llama" else _tiny_gpt2(tokenizer)
    model.to(dtype)
    return LocalModel(model=model, tokenizer=tokenizer, model_id=spec)


def _byte_level_chat_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (a BPE with no merges) plus ChatML specials; pad token deliberately distinct."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte_symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: the set's order varies by call
        vocab.setdefault(byte_symbol, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, no chat template and no pad token (so the missing-pad path runs)."""
    specials = ["<|endoftext|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + TINY_ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>"
    )


def _tiny_llama(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=TINY_INIT_STD,
    )
    return LlamaForCausalLM(config)


def _tiny_gpt2(tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=TINY_INIT_STD,
    )
    return GPT2LMHeadModel(config)
