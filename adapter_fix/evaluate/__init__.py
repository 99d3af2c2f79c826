"""Measuring a model with its adapters: prompt sets, generation, a refusal judge, metrics.

The importable core (the gated repair calibrates with it):

    from adapter_fix.evaluate import (
        load_prompt_set, default_prompt_set,        # prompts.py: data, no torch
        make_judge, judge_answers, KeywordJudge,    # judges/: the Judge protocol, keyword first
        load_model, attach_adapters,                # model.py: transformers + peft, loaded once
        generate, reference_nll, encode_prompts,    # generate.py: greedy, batched, teacher-forced
        continuation_logprob,                       #   differentiable log p(continuation | prompt)
        rate, wilson_interval, mean_token_nll,      # metrics.py: pure
        restored_refusal, kept_task,
    )

The objectives that score a model on prompts, shared by the gated repair and `check`'s
probe, are in `adapter_fix.evaluate.objectives` (refusal margin, task loss: batched,
logits only at the scored positions, backward batch by batch), the probe in
`adapter_fix.evaluate.probe`; they are imported from there, not re-exported here.

`load_model` and `generate` need the `eval` extra (transformers, peft); the
imports here do not, so this package imports without it.
"""

from __future__ import annotations

from adapter_fix.evaluate.generate import (
    continuation_logprob,
    encode_prompts,
    format_prompt,
    generate,
    reference_nll,
)
from adapter_fix.evaluate.judges import (
    DEFAULT_REFUSAL_PHRASES,
    Judge,
    KeywordJudge,
    Verdict,
    judge_answers,
    make_judge,
)
from adapter_fix.evaluate.metrics import (
    Rate,
    TokenNLL,
    agreement,
    exact_match,
    kept_task,
    mean_token_nll,
    rate,
    restored_refusal,
    wilson_interval,
)
from adapter_fix.evaluate.model import LoadedModel, attach_adapters, load_model
from adapter_fix.evaluate.prompts import Prompt, PromptSet, default_prompt_set, load_prompt_set

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "Judge",
    "KeywordJudge",
    "LoadedModel",
    "Prompt",
    "PromptSet",
    "Rate",
    "TokenNLL",
    "Verdict",
    "agreement",
    "attach_adapters",
    "continuation_logprob",
    "default_prompt_set",
    "encode_prompts",
    "exact_match",
    "format_prompt",
    "generate",
    "judge_answers",
    "kept_task",
    "load_model",
    "load_prompt_set",
    "make_judge",
    "mean_token_nll",
    "rate",
    "reference_nll",
    "restored_refusal",
    "wilson_interval",
]
