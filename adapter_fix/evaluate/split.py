"""A calibration/held-out split of a prompt set that every command computes alike.

A prompt belongs to the calibration part when a hash of the seed and its text
falls below `share`: the split depends on neither the file's order nor its
other prompts, so `repair --method gate` (which calibrates on one part) and
`eval` (which reports on the other) agree on it with nothing but the seed
and the share passed to both.
"""

from __future__ import annotations

import hashlib

from adapter_fix.evaluate.prompts import PromptSet


def calibration_position(text: str, seed: int) -> float:
    """Where the prompt falls in [0, 1): the first 8 bytes of SHA-256(seed, text)."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_prompts(prompts: PromptSet, share: float, seed: int) -> tuple[PromptSet, PromptSet]:
    """`(calibration, held_out)`: prompts below `share`, and the rest; file order is kept."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the calibration share must be in [0, 1], got {share}")
    calibration = tuple(p for p in prompts.prompts if calibration_position(p.text, seed) < share)
    held_out = tuple(p for p in prompts.prompts if calibration_position(p.text, seed) >= share)
    return (
        PromptSet(f"{prompts.name} (calibration)", prompts.origin, calibration, prompts.dropped),
        PromptSet(f"{prompts.name} (held out)", prompts.origin, held_out, prompts.dropped),
    )
