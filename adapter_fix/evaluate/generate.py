"""Prompting a causal LM: chat formatting, batched greedy generation, teacher-forced NLL.

Needs `transformers` (the `eval` extra); the model and tokenizer are any
`AutoModelForCausalLM` / `AutoTokenizer` pair, with or without a PEFT wrapper.

Determinism: decoding is greedy, so the same model, prompts, batch size and
device give the same text. Prompts are batched in order of decreasing length
(less padding; the order is stable, so batches are the same every run) and
the answers returned in the prompts' order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from adapter_fix.errors import UsageError
from adapter_fix.evaluate.metrics import TokenNLL
from adapter_fix.evaluate.objectives import Scored, repeated_prefix, shared_prefix

# on_batch(prompts_done_in_this_batch, tokens_generated_in_this_batch)
BatchCallback = Callable[[int, int], None]


THINKING_FLAG = "enable_thinking"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def takes_thinking_flag(tokenizer: Any) -> bool:
    """The chat template reads `enable_thinking` (Qwen3-style thinking models)."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(text, str) and THINKING_FLAG in text for text in texts)


def format_prompt(
    tokenizer: Any, prompt: str, system: str | None = None, thinking: bool = False
) -> str:
    """The text the model sees: its chat template with the generation prompt added.

    Without a chat template the prompt is used raw (after `system` and a blank
    line when given); callers warn the user (`has_chat_template`). A template
    that reads `enable_thinking` gets `thinking` (False by default: the answer
    itself, not a thinking block, within the tokens generated).
    """
    if not has_chat_template(tokenizer):
        return f"{system}\n\n{prompt}" if system else prompt
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    flags = {THINKING_FLAG: thinking} if takes_thinking_flag(tokenizer) else {}
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **flags
        )
    except Exception as error:  # jinja2 errors, and templates' own raise_exception()
        hint = " (the template may not accept a system message: drop --system)" if system else ""
        raise UsageError(
            f"the tokenizer's chat template rejected the conversation: {error}{hint}."
        ) from None
    return str(text)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], system: str | None = None, thinking: bool = False
) -> list[list[int]]:
    """Token ids of each formatted prompt.

    A chat template writes its own special tokens (BOS and turn markers), so
    templated text is tokenized without adding any; raw text gets the
    tokenizer's usual special tokens, as in pretraining.
    """
    templated = has_chat_template(tokenizer)
    return [
        list(
            tokenizer(
                format_prompt(tokenizer, prompt, system, thinking), add_special_tokens=not templated
            )["input_ids"]
        )
        for prompt in prompts
    ]


def reference_ids(tokenizer: Any, reference: str, stops: Sequence[int]) -> list[int]:
    """A task reference's token ids as a finished answer: its own tokens (no special tokens
    added), then the first stop token (the answer ends there, so a longer answer does not
    match it); no stop token when `stops` is empty."""
    return [*tokenizer(reference, add_special_tokens=False)["input_ids"], *stops[:1]]


def pad_id(tokenizer: Any) -> int:
    """The padding token id: the tokenizer's, else its EOS (attention masks hide it), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the generation config's EOS ids, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(token) for token in (eos if isinstance(eos, list | tuple) else [eos])]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length: longest first, stable order."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def left_padded(
    sequences: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, attention mask)`, both `(len(sequences), width)` on `device`: each sequence
    right-aligned after `pad` tokens (mask 0 there)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    thinking: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    on_batch: BatchCallback | None = None,
) -> list[str]:
    """Greedy answers to `prompts`, one string each, in the prompts' order.

    Prompts are formatted with `format_prompt`, left-padded into batches of
    `batch_size` and decoded greedily for at most `max_new_tokens` tokens;
    an answer ends at the first stop token (`stop_ids`), which is not part of
    the returned text, nor are special tokens.
    """
    answers = generate_ids(
        model,
        encode_prompts(tokenizer, prompts, system, thinking),
        pad=pad_id(tokenizer),
        stops=stop_ids(model, tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    return [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in answers]


@torch.inference_mode()
def generate_ids(
    model: Any,
    encoded: Sequence[Sequence[int]],
    *,
    pad: int,
    stops: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    on_batch: BatchCallback | None = None,
) -> list[list[int]]:
    """Greedy answers to already encoded prompts, as token ids ending before the first stop.

    A batch's shared prefix (a chat template's system turn, `shared_prefix`) runs once, its
    key/value cache repeated for every prompt; each prompt's rest follows it, left-padded,
    with positions counted past the padding (as the objectives score them)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=list(stops) or None,
    )
    device = _model_device(model)
    answers: list[list[int]] = [[] for _ in encoded]
    for batch in _batches([len(ids) for ids in encoded], batch_size):
        prompts = [list(encoded[index]) for index in batch]
        prefix = shared_prefix([Scored(prompt, 0) for prompt in prompts])
        cache = repeated_prefix(model, prompts[0][:prefix], len(batch)) if prefix else None
        if cache is None:
            ids, mask = left_padded(prompts, pad, device)
        else:  # the shared prefix, then each prompt's rest left-padded after it
            rest, rest_mask = left_padded([prompt[prefix:] for prompt in prompts], pad, device)
            shared = torch.tensor(prompts[0][:prefix], dtype=torch.long, device=device)
            ids = torch.cat([shared.expand(len(batch), -1), rest], dim=1)
            mask = torch.cat([torch.ones_like(ids[:, :prefix]), rest_mask], dim=1)
        output = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, **(cache or {})
        )
        for row, index in enumerate(batch):
            new = output[row, ids.shape[1] :].tolist()
            answers[index] = new[: next((at for at, t in enumerate(new) if t in stops), len(new))]
        if on_batch is not None:
            on_batch(len(batch), sum(len(answers[index]) for index in batch))
    return answers


def continuation_logprob(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str] | Sequence[Sequence[int]],
    *,
    system: str | None = None,
    thinking: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Summed log-probability of each continuation after its formatted prompt, in ONE batch.

    `continuations` are texts (tokenized without special tokens) or token id
    lists. Returns (log-probs, shape `(len(prompts),)`, float32, on the model's
    device; token counts). Differentiable: run it under `torch.no_grad()` or
    with gradients (e.g. with respect to gates on adapter outputs), and batch
    the prompts yourself. Right-padded, so no position adjustment is needed.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    prompt_ids = encode_prompts(tokenizer, prompts, system, thinking)
    targets = [
        list(tokenizer(item, add_special_tokens=False)["input_ids"])
        if isinstance(item, str)
        else [int(token) for token in item]
        for item in continuations
    ]
    return sequence_logprobs(model, prompt_ids, targets, pad_id(tokenizer)), [
        len(target) for target in targets
    ]


def sequence_logprobs(
    model: Any, prompt_ids: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad: int
) -> torch.Tensor:
    """Summed log-probability of each `targets[i]` after `prompt_ids[i]`, in one batch.

    Token ids in, `(len(prompt_ids),)` float32 out on the model's device;
    differentiable (gradients reach whatever the forward depends on, e.g. gates
    on adapter outputs). Right-padded, so no position adjustment is needed.
    """
    sequences = [p + t for p, t in zip(prompt_ids, targets, strict=True)]
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    device = _model_device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    totals = []
    for row, (prompt, target) in enumerate(zip(prompt_ids, targets, strict=True)):
        if not target:
            totals.append(logits.new_zeros((), dtype=torch.float32))
            continue
        # Position t predicts token t + 1: the continuation is predicted from len(prompt) - 1.
        start = len(prompt) - 1
        scores = logits[row, start : start + len(target)].float().log_softmax(dim=-1)
        wanted = torch.tensor(target, dtype=torch.long, device=scores.device)
        totals.append(scores.gather(1, wanted[:, None]).sum())
    return torch.stack(totals)


@torch.inference_mode()
def reference_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    system: str | None = None,
    thinking: bool = False,
    batch_size: int = 8,
    on_batch: BatchCallback | None = None,
) -> list[TokenNLL]:
    """Teacher-forced negative log-likelihood (nats) of each reference after its prompt.

    The input is the formatted prompt's ids followed by the reference's own
    ids (tokenized without special tokens); only the reference tokens are
    scored (`continuation_logprob`, batched). Pool with `metrics.mean_token_nll`.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts for {len(references)} references")
    results: list[TokenNLL] = [TokenNLL(0.0, 0)] * len(prompts)
    lengths = [
        len(prompt) + len(reference) for prompt, reference in zip(prompts, references, strict=True)
    ]
    for batch in _batches(lengths, batch_size):
        logprobs, counts = continuation_logprob(
            model,
            tokenizer,
            [prompts[index] for index in batch],
            [references[index] for index in batch],
            system=system,
            thinking=thinking,
        )
        for index, logprob, count in zip(batch, logprobs.tolist(), counts, strict=True):
            results[index] = TokenNLL(-float(logprob), count)
        if on_batch is not None:
            on_batch(len(batch), sum(counts))
    return results
