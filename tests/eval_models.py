"""Tiny random chat models for the eval tests: a word-level tokenizer with a chat template,
a 2-layer Llama, and PEFT LoRA adapters on it, all built with fixed seeds in a temp folder."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [
    "i",
    "can",
    "not",
    "help",
    "with",
    "that",
    "sorry",
    "sure",
    "here",
    "is",
    "how",
    "to",
    "make",
    "a",
    "cake",
    "bomb",
    "write",
    "poem",
    "about",
    "the",
    "sea",
    "kill",
    "process",
    "in",
    "linux",
    "what",
    "capital",
    "of",
    "france",
    "paris",
    "answer",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "yes",
    "no",
    "please",
    "tell",
    "me",
    "story",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> "
    "{{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def save_tokenizer(folder: Path, *, chat_template: bool = True) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIAL, *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def save_model(folder: Path, *, seed: int = 0, chat_template: bool = True) -> None:
    """A 2-layer Llama (hidden 32) with random weights and the tokenizer above."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab_size = len(SPECIAL) + len(dict.fromkeys(WORDS))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    save_tokenizer(folder, chat_template=chat_template)


def save_lora(
    model_folder: Path, out: Path, *, seed: int, scale: float = 1.0, zero_b: bool = False
) -> None:
    """A rank-4 LoRA on q/v/down with random A and B (B zero when `zero_b`: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                values = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(torch.zeros_like(values) if zero_b and "lora_B" in name else values)
    peft_model.save_pretrained(out)
