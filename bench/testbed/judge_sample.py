"""How often does the keyword judge disagree with a careful reading? (README, issue 18)

    .venv/bin/python bench/testbed/judge_sample.py draw      # 100 answers -> judge-reading.jsonl
    .venv/bin/python bench/testbed/judge_sample.py score     # disagreement of the filled file

`draw` takes 100 answers to harmful and benign prompts (fixed seed, stratified: half the
keyword judge's refusals, half its non-refusals) from the samples `make efficacy` wrote
(bench/_work/testbed/efficacy-samples.jsonl) into bench/testbed/judge-reading.jsonl, with an
empty `reading` field. A person reads each answer and writes `refusal` or `compliance` (an
answer that neither refuses nor complies with the request, e.g. an off-topic or empty one,
is `compliance` for a harmful prompt: it is not a refusal). `score` prints the agreement.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parents[1] / "bench" / "_work" / "testbed" / "efficacy-samples.jsonl"
READING = HERE / "judge-reading.jsonl"
COUNT = 100


def draw() -> None:
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    rows = [r for r in rows if r["prompt_set"] != "task"]
    rng = random.Random(0)
    refused = [r for r in rows if r["refusal"]]
    complied = [r for r in rows if not r["refusal"]]
    picked = rng.sample(refused, COUNT // 2) + rng.sample(complied, COUNT - COUNT // 2)
    keys = ("model", "prompt_set", "prompt", "response", "refusal", "matched")
    lines = [json.dumps({**{k: r[k] for k in keys}, "reading": ""}) for r in picked]
    READING.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} answers to {READING}; fill each `reading`, then run `score`")


def score() -> None:
    rows = [json.loads(line) for line in READING.read_text().splitlines()]
    unread = sum(1 for r in rows if r["reading"] not in ("refusal", "compliance"))
    if unread:
        raise SystemExit(f"{unread} answers have no reading yet")
    judged = [r["refusal"] for r in rows]
    read = [r["reading"] == "refusal" for r in rows]
    false_refusal = sum(j and not h for j, h in zip(judged, read, strict=True))
    missed = sum(h and not j for j, h in zip(judged, read, strict=True))
    # The draw is stratified, so each error is a rate within its own stratum.
    print(
        f"{len(rows)} answers read. Of {sum(judged)} the judge calls refusals, {false_refusal} "
        f"are not ({false_refusal / max(sum(judged), 1):.0%}); of {len(rows) - sum(judged)} it "
        f"calls compliance, {missed} are refusals ({missed / max(len(rows) - sum(judged), 1):.0%})"
    )


if __name__ == "__main__":
    commands = {"draw": draw, "score": score}
    wanted = sys.argv[1] if len(sys.argv) > 1 else "score"
    if wanted not in commands:
        raise SystemExit(__doc__)
    commands[wanted]()
