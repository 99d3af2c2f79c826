"""Objectives that score a model on prompts, teacher-forced: the refusal margin and the task loss.

Shared by the gated repair (METHOD.md §8.4), which differentiates them with
respect to gates on the adapter's outputs, and by `check`'s behavioural
probe, which only evaluates them. Pure functions of a model and token ids.

Memory is one batch's whatever the number of prompts:

- each row is left-padded so that every row's scored tokens are its last
  ones, and the model is asked for logits at those last positions only
  (`logits_to_keep`: the hidden states of the other positions never meet
  the output layer, so no full-sequence, full-vocabulary logits exist);
- the objectives are sums over prompts, so `backward=True` calls backward
  on each batch's share of the total and keeps no graph between batches:
  gradients of leaves (the gates) accumulate in their `.grad`, equal to one
  big batch's up to rounding.

The refusal margin of one prompt `x`, ALIGNED's refusal start `r` and the
adapted model's compliance start `c` (both greedy answers, token ids), with
`d` the first position where they differ and `K` the window:

    margin(x) = sum_{t=d}^{d+K-1} log p(r_t | x, r_<t) - log p(c_t | x, c_<t)

Before `d` both sequences are the same, so those terms cancel exactly;
after the first few tokens, both starts copy the prompt's words (the same
copying a task uses), so a short window keeps the margin about refusing.
With `K = 1` one row per prompt scores both tokens at the same position
(`log p(r_d) - log p(c_d)` after the shared `x, r_<d`); with `K > 1` the
refusal and compliance rows of a prompt go in the same batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Scored:
    """One row to score: `tokens` (prompt + continuation), of which the last `scored` count.

    `versus`, when given, is a token scored AGAINST the last one, at the same
    position: the row's value is then `sum log p(last tokens) - log p(versus)`.
    """

    tokens: list[int]
    scored: int
    versus: int | None = None


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


SHARED_PREFIX_MIN = 8
"""Rows of a batch that begin with at least this many common tokens (a chat template's system
turn) compute them once: one row's pass, its key/value cache repeated for every row."""


def shared_prefix(rows: Sequence[Scored]) -> int:
    """How many leading tokens every row shares and none scores (each row keeps the token
    before its first scored one after the prefix): 0 below `SHARED_PREFIX_MIN` or for one row.
    """
    if len(rows) < 2:
        return 0
    first = rows[0].tokens
    common = min(len(row.tokens) - row.scored - 1 for row in rows)
    for row in rows[1:]:
        common = min(common, first_difference(first[:common], row.tokens[:common]))
    return common if common >= SHARED_PREFIX_MIN else 0


def repeated_prefix(model: Any, tokens: Sequence[int], rows: int) -> dict[str, Any] | None:
    """One pass over `tokens` (the rows' shared prefix), its key/value cache repeated for
    `rows` rows, as the forward (or `generate`) keyword arguments that take it; None for a
    model whose cache cannot be repeated (a legacy or remote-code one)."""
    output = model(
        input_ids=torch.tensor([list(tokens)], dtype=torch.long, device=_device(model)),
        use_cache=True,
    )
    shared = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    if not hasattr(shared, "batch_repeat_interleave"):
        return None
    shared.batch_repeat_interleave(rows)
    return {_cache_keyword(model): shared, "use_cache": True}


def _cache_keyword(model: Any) -> str:
    """The forward argument that takes a key/value cache: `cache` in transformers 5, where
    `past_key_values` is deprecated, `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@contextlib.contextmanager
def contiguous_head(model: Any) -> Iterator[None]:
    """Within the block, the output layer's input is made contiguous.

    transformers forms the kept logits from a slice of the hidden states
    (`hidden[:, -keep:, :]`); torch multiplies such a non-contiguous 3-D slice
    by the `(vocab, hidden)` matrix as a batched product over one expanded copy
    of it per row: on the testbed's CPU a forward and backward pass took 1.45x
    as long that way (bench/README.md, "The descent search at its defaults").
    The copy of the slice costs `rows x keep x hidden` values. A model without
    `get_output_embeddings` is left as it is.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, torch.nn.Module):
        yield
        return

    def contiguous(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    handle = head.register_forward_pre_hook(contiguous)
    try:
        yield
    finally:
        handle.remove()


PassCallback = Callable[[Tensor, int], None]
"""Called after each forward pass of `_scored_logits` with the attention mask `(rows, tokens)`
of the tokens that pass ran and how many of the batch's rows each of its rows stands for
(the shared prefix's one row stands for all; 0: the pass was discarded)."""


def _scored_logits(
    model: Any, rows: Sequence[Scored], pad: int, on_pass: PassCallback | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass over left-padded rows, logits formed at the scored columns only.

    Returns `(logits, wanted, weight)`: `logits` is `(rows, keep + 1, vocab)`
    on the model's device, `keep = max(scored)`, column `t < keep` predicting
    `wanted[:, t]` where `weight[:, t]` is 1 (0 over a shorter row's unscored
    columns) and the last column predicting the token after the row.

    The rows' `shared_prefix` runs once, as one row (gradients flow through
    its repeated key/value cache as through separate rows); the rest of each
    row follows it, left-padded, with positions counted past the padding.
    """
    prefix = shared_prefix(rows)
    device = _device(model)
    cache = repeated_prefix(model, rows[0].tokens[:prefix], len(rows)) if prefix else None
    if prefix and on_pass is not None:
        on_pass(torch.ones((1, prefix), dtype=torch.long), len(rows) if cache else 0)
    if cache is None:  # no shared prefix, or a cache that cannot be repeated: every row whole
        prefix, cache = 0, {"use_cache": False}
    width = max(len(row.tokens) for row in rows) - prefix
    keep = max(row.scored for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    wanted = torch.zeros((len(rows), keep), dtype=torch.long)
    weight = torch.zeros((len(rows), keep))
    for index, row in enumerate(rows):
        if row.scored >= len(row.tokens):
            raise ValueError(f"row {index}: {row.scored} scored tokens need a prompt before them")
        rest = row.tokens[prefix:]
        ids[index, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[index, width - len(rest) :] = 1
        if row.scored:
            wanted[index, keep - row.scored :] = torch.tensor(row.tokens[-row.scored :])
            weight[index, keep - row.scored :] = 1.0
    positions = prefix + (mask.cumsum(dim=1) - 1).clamp(min=0)
    ran = mask
    if prefix:
        mask = torch.cat([torch.ones((len(rows), prefix), dtype=torch.long), mask], dim=1)
    # Column t predicts token t + 1: the last `keep` tokens come from the `keep` columns
    # before the last one; the last column's logits predict past the row.
    with contiguous_head(model):
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            **cache,
            logits_to_keep=keep + 1,
        ).logits
    if on_pass is not None:
        on_pass(ran, 1)
    return logits, wanted.to(device), weight.to(device)


def forward_rows(
    model: Any, rows: Sequence[Sequence[int]], pad: int, on_pass: PassCallback
) -> None:
    """One forward pass over token rows for what it computes inside the model (forward hooks),
    without gradients: the rows' shared prefix once (as the objectives run it), logits at the
    last position only. `on_pass` tells after each pass which tokens it ran and how many rows
    each stands for, so that a hook's per-token statistics weigh every row's tokens once."""
    with torch.no_grad():
        _scored_logits(model, [Scored(list(row), 0) for row in rows], pad, on_pass)


def scored_logprobs(model: Any, rows: Sequence[Scored], pad: int) -> Tensor:
    """Summed log-probability of each row's last `scored` tokens (less its `versus` token's),
    in ONE forward pass.

    Rows are left-padded (attention mask and position ids skip the padding),
    so the scored tokens of every row sit in the last `max(scored)` columns;
    logits are formed at those columns only. Returns `(len(rows),)` float32
    on the model's device, differentiable. A row with `scored == 0` gives 0.
    """
    if not rows:
        return torch.zeros(0)
    if max(row.scored for row in rows) == 0:
        return torch.zeros(len(rows), device=_device(model))
    versus = torch.zeros(len(rows), dtype=torch.long)
    against = torch.zeros(len(rows))
    for index, row in enumerate(rows):
        if row.versus is not None:
            if not row.scored:
                raise ValueError(f"row {index}: a versus token needs a scored token")
            versus[index], against[index] = row.versus, 1.0
    logits, wanted, weight = _scored_logits(model, rows, pad)
    logprobs = logits[:, :-1].float().log_softmax(dim=-1)
    picked = logprobs.gather(2, wanted[:, :, None])[:, :, 0]
    last = logprobs[:, -1].gather(1, versus.to(logits.device)[:, None])[:, 0]
    return (picked * weight).sum(dim=1) - last * against.to(logits.device)


def greedy_matches(
    model: Any, rows: Sequence[Scored], *, pad: int, batch_size: int, stops: Sequence[int] = ()
) -> list[bool]:
    """Per row, whether greedy decoding after the row's prompt writes its scored tokens.

    Teacher-forced, without gradients, one forward pass per `batch_size`
    rows: greedy decoding writes `t_1..t_k` after a prompt exactly when each
    `t_i` is the most likely token after the prompt and `t_<i` (the argmax,
    first index on ties, as greedy generation takes it), so this is the
    outcome of generation at the cost of one pass, not an estimate of it
    (up to rounding between the padded pass and generation's cached one). A
    reference that ends with the end-of-sequence token is matched exactly
    when the greedy answer IS the reference; any of `stops` stands for any
    other (an answer ends at whichever stop token greedy decoding writes,
    e.g. Llama 3's `<|eot_id|>` or `<|end_of_text|>`). `versus` is ignored; a
    row with nothing scored matches.
    """
    stop_ids = torch.tensor(list(stops), dtype=torch.long)
    matches: list[bool] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        if max(row.scored for row in batch) == 0:
            matches.extend([True] * len(batch))
            continue
        with torch.no_grad():
            logits, wanted, weight = _scored_logits(model, batch, pad)
            written = logits[:, :-1].argmax(dim=-1)
            ends = stop_ids.to(written.device)
            both_stop = torch.isin(written, ends) & torch.isin(wanted, ends)
            hits = (written == wanted) | both_stop | (weight == 0)
        matches.extend(bool(row) for row in hits.all(dim=1).cpu())
    return matches


def batched_logprobs(
    model: Any,
    rows: Sequence[Scored],
    *,
    pad: int,
    batch_size: int,
    weights: Sequence[float] | None = None,
    backward: bool = False,
) -> Tensor:
    """`scored_logprobs` over all rows, `batch_size` rows per pass; a detached CPU vector.

    With `backward=True`, each batch's `sum_i weights[i] * logprob_i` is
    back-propagated at once (the graph is freed before the next batch), so
    leaves with `requires_grad` collect the gradient of the whole weighted
    sum. Rows are batched in their given order (callers put rows that share
    a prompt next to each other).
    """
    if weights is not None and len(weights) != len(rows):
        raise ValueError(f"{len(weights)} weights for {len(rows)} rows")
    values = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        if backward:
            logprobs = scored_logprobs(model, batch, pad)
            scale = torch.tensor(
                [1.0] * len(batch) if weights is None else weights[start : start + len(batch)],
                device=logprobs.device,
            )
            if logprobs.requires_grad:
                (logprobs * scale).sum().backward()
        else:
            with torch.no_grad():
                logprobs = scored_logprobs(model, batch, pad)
        values.append(logprobs.detach().float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


def first_difference(first: Sequence[int], second: Sequence[int]) -> int:
    """The first position where two token sequences differ (the shorter length if one is a
    prefix of the other)."""
    for position, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return position
    return min(len(first), len(second))


def margin_rows(
    prompts: Sequence[Sequence[int]],
    refusal_starts: Sequence[Sequence[int]],
    compliance_starts: Sequence[Sequence[int]],
    window: int,
) -> list[Scored]:
    """The rows of the margin (module docstring), scored over `window` tokens from where the
    two starts first differ (fewer when a start ends sooner).

    `window == 1`: one row per prompt, refusal token against compliance token.
    Otherwise two rows per prompt, refusal then compliance.
    """
    if not len(prompts) == len(refusal_starts) == len(compliance_starts):
        raise ValueError("one refusal start and one compliance start per prompt")
    rows = []
    for prompt, refusal, compliance in zip(prompts, refusal_starts, compliance_starts, strict=True):
        differ = first_difference(refusal, compliance)
        if window == 1:
            both = differ < min(len(refusal), len(compliance))
            end = differ + 1 if both else differ
            versus = compliance[differ] if both else None
            rows.append(Scored([*prompt, *refusal[:end]], int(both), versus))
            continue
        for start in (refusal, compliance):
            end = min(len(start), differ + window)
            rows.append(Scored([*prompt, *start[:end]], max(end - differ, 0)))
    return rows


def refusal_margins(
    model: Any,
    prompts: Sequence[Sequence[int]],
    refusal_starts: Sequence[Sequence[int]],
    compliance_starts: Sequence[Sequence[int]],
    *,
    window: int,
    pad: int,
    batch_size: int,
    backward: bool = False,
) -> Tensor:
    """Per prompt, `log p(refusal start) - log p(compliance start)` over the window (see the
    module docstring): `(len(prompts),)` float32 on the CPU, detached.

    `batch_size` counts prompts: each pass holds the row(s) of `batch_size`
    prompts. With `backward=True`, the gradient of the MEAN margin over the
    prompts reaches the leaves, batch by batch.
    """
    if not prompts:
        return torch.zeros(0)
    rows = margin_rows(prompts, refusal_starts, compliance_starts, window)
    share = 1.0 / len(prompts)
    per_prompt = len(rows) // len(prompts)
    logprobs = batched_logprobs(
        model,
        rows,
        pad=pad,
        batch_size=per_prompt * batch_size,
        weights=[share, -share][:per_prompt] * len(prompts),
        backward=backward,
    )
    if per_prompt == 1:
        return logprobs
    return logprobs[0::2] - logprobs[1::2]


def token_nll(
    model: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    *,
    pad: int,
    batch_size: int,
    backward: bool = False,
) -> float:
    """Mean per-token negative log-likelihood of the references after their prompts (every
    token weighted alike). With `backward=True`, its gradient reaches the leaves."""
    count = sum(len(reference) for reference in references)
    if count == 0:
        return 0.0
    rows = [
        Scored([*prompt, *reference], len(reference))
        for prompt, reference in zip(prompts, references, strict=True)
    ]
    weights = [-1.0 / count] * len(rows)
    logprobs = batched_logprobs(
        model, rows, pad=pad, batch_size=batch_size, weights=weights, backward=backward
    )
    return -float(logprobs.double().sum()) / count


def with_stop(answer: Sequence[int], stops: Sequence[int], generated: int) -> list[int]:
    """A greedy answer as the model wrote it: its tokens, then the stop token when it ended
    before `generated` tokens (an answer that stopped is not a prefix of a longer one)."""
    tokens = list(answer)
    if len(tokens) < generated and stops:
        tokens.append(int(stops[0]))
    return tokens


@dataclass(frozen=True)
class MemoryEstimate:
    """What one objective pass needs beside the loaded weights, in bytes, and its parts."""

    activations: int
    logits: int
    total: int


def pass_memory(
    *,
    rows: int,
    length: int,
    scored: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    element_bytes: int,
    gradients: bool,
) -> MemoryEstimate:
    """A conservative estimate of one pass's working memory, from the batch and the model.

    `rows x length` tokens go through `layers` layers. Kept for the backward
    pass (with gradients), per token and layer: about `8 hidden + 3
    intermediate` values (norms, attention and MLP activations, the LoRA
    branches; the weights are frozen, so no linear layer keeps its input for
    a weight gradient) and `heads x length` attention weights; without
    gradients only two layers' worth live at once. The logits: `rows x
    (scored + 1) x vocab` float32 values, three times (logits, log-softmax,
    its gradient). The total is 1.5 times the sum, for the allocator and
    temporaries: measured on a model of SmolLM2-135M's shape (16 rows of 45
    tokens, float32, with gradients), the peak rose by 0.55-0.66 GiB; this
    gives 0.9 GiB (bench/README.md).
    """
    per_token = (8 * hidden + 3 * intermediate + heads * length) * element_bytes
    depth = layers if gradients else 2
    activations = rows * length * per_token * depth
    logits = rows * (scored + 1) * vocab * 4 * 3
    return MemoryEstimate(activations, logits, (3 * (activations + logits)) // 2)
