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
# Qwen3's rule in small: thinking unless the caller passes enable_thinking=False, which
# closes an empty thinking block in the prompt.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|assistant|> {% endif %}",
    "<|assistant|> {% if enable_thinking is defined and enable_thinking is false %}"
    "<think> </think> {% endif %}{% endif %}",
)


def save_tokenizer(
    folder: Path,
    *,
    chat_template: bool = True,
    template: str = CHAT_TEMPLATE,
    first_words: tuple[str, ...] = (),
) -> None:
    """The word-level tokenizer; `first_words` take the lowest ids (before the specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*first_words, *SPECIAL, *WORDS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
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
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


def tiny_llama_config(**overrides: object) -> object:
    """The 2-layer Llama (hidden 32) shape every tiny model here shares."""
    from transformers import LlamaConfig

    settings: dict[str, object] = {
        "vocab_size": len(dict.fromkeys([*SPECIAL, *WORDS])),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**settings, **overrides})


def save_model(
    folder: Path, *, seed: int = 0, chat_template: bool = True, template: str = CHAT_TEMPLATE
) -> None:
    """A 2-layer Llama (hidden 32) with random weights and the tokenizer above."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(folder)
    save_tokenizer(folder, chat_template=chat_template, template=template)


def save_classifier(
    folder: Path, labels: list[str], *, seed: int = 0, constant: bool = False
) -> None:
    """A tiny Llama sequence classifier over the tokenizer above, `labels` as id2label.

    constant: the score head zeroed, so every logit is 0 and the first label wins on every
    input (argmax takes the first of equal values); else random weights, whose verdicts
    depend on the text.
    """
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_llama_config(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    model = LlamaForSequenceClassification(config)
    if constant:
        with torch.no_grad():
            model.score.weight.zero_()
    model.save_pretrained(folder)
    save_tokenizer(folder, chat_template=False)


GUARD_TEMPLATE = (
    "{{ bos_token }}<|user|> is this safe {% for message in messages %}"
    "{{ message['content'] }} {% endfor %}<|end|> <|assistant|> "
)


def save_guard(folder: Path, reply: str) -> None:
    """A tiny causal LM with a guard-style chat template that replies `reply` to everything:
    its final norm is zero, so every logit is 0 and greedy decoding picks token id 0, which
    is `reply`'s word."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(dict.fromkeys([reply, *SPECIAL, *WORDS])),
        bos_token_id=3,
        eos_token_id=4,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(folder)
    save_tokenizer(folder, template=GUARD_TEMPLATE, first_words=(reply,))


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
