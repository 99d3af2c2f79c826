"""`--device cuda`: the gated repair, eval and the subspace repair on a GPU.

Skipped where CUDA is not available (CI); run on a GPU machine with
`python -m pytest tests/test_cuda.py` (bench/gpu_check.py runs it there too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPTS = FIXTURES / "chat-prompts"


def test_gates_live_on_the_models_device_and_factors_come_back_on_the_cpu(lora_model):
    from adapter_fix.methods.gate import GatedModel, gated_factors

    model, names = lora_model
    model.to("cuda")
    gated = GatedModel(model, names, "module")  # module gates leave the fixture's factors
    try:
        assert {layer.gates.device.type for layer in gated.layers} == {"cuda"}
        gated.set_values(torch.zeros(len(gated.values())))  # a CPU vector goes to each layer
        assert {layer.gates.device.type for layer in gated.layers} == {"cuda"}
        for lora_b, lora_a in gated_factors(gated).values():
            assert lora_b.device.type == lora_a.device.type == "cpu"
            assert not lora_b.any()
    finally:
        gated.remove()
        model.to("cpu")


SEARCHES = {
    "order": ("--rounds", "1"),
    # --descent-steps asks for the descent (from ALIGNED, the default start); with benign
    # prompts, for the over-refusal bound and the benign term: checkpoints at 15 and 20.
    "descent": (
        *("--benign", PROMPTS / "benign-calib.jsonl"),
        *("--descent-steps", "20", "--calibration-tokens", "8"),
    ),
}


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gated_repair_on_cuda_writes_the_adapters_keys_and_dtypes(tmp_path, dtype, search):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    result = run_cli(
        "repair",
        *(FIXTURES / name for name in ("chat-base", "chat-aligned", "chat-attack")),
        *("-o", out, "--method", "gate"),
        *("--harmful", PROMPTS / "harmful-calib.jsonl"),
        *("--task", PROMPTS / "task-calib.jsonl"),
        *("--refusal-patterns", PROMPTS / "refusal-phrases.txt"),
        *("--calibration-share", "0.3", "--task-budget", "1", *SEARCHES[search]),
        *("--device", "cuda", "--dtype", dtype, "-q"),
    )
    assert result.exit_code == 0, result.stderr
    original = load_file(str(FIXTURES / "chat-attack" / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    assert {k: t.dtype for k, t in written.items()} == {k: t.dtype for k, t in original.items()}
    assert all(bool(t.isfinite().all()) for t in written.values())
    report = json.loads((out / "repair_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["options"]["search"] == search
    if search == "order":
        assert any(m["action"] == "gated" for m in report["modules"])
    else:  # the miniature's checkpoints may not pass the bounds: the adapter then stays
        assert calibration["descent"]["start"] == "aligned"
        assert [r["steps"] for r in calibration["rounds"]] == [15, 20]
        assert all(r["benign_prompts"] for r in calibration["rounds"])
        assert calibration["descent"]["separated_layers"] > 0


def test_eval_on_cuda_agrees_with_the_cpu():
    def rates(device: str) -> list[float]:
        result = run_cli(
            "eval",
            FIXTURES / "chat-aligned",
            FIXTURES / "chat-attack",
            *("--harmful", PROMPTS / "harmful-eval.jsonl"),
            *("--task", PROMPTS / "task-eval.jsonl"),
            *("--refusal-patterns", PROMPTS / "refusal-phrases.txt"),
            *("--max-new-tokens", "24", "--device", device, "--dtype", "float32"),
            *("--json", "-q"),
        )
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)["rows"]
        return [row[key]["rate"] for row in rows for key in ("refusal", "exact_match")]

    assert rates("cuda") == pytest.approx(rates("cpu"), abs=0.05)


def test_subspace_repair_on_cuda_matches_the_cpu(tmp_path):
    from safetensors.torch import load_file

    inputs = [FIXTURES / name for name in ("llama-base", "llama-aligned", "llama-lora")]
    written = {}
    for device in ("cuda", "cpu"):
        result = run_cli("repair", *inputs, "-o", tmp_path / device, "--device", device, "-q")
        assert result.exit_code == 0, result.stderr
        written[device] = load_file(str(tmp_path / device / "adapter_model.safetensors"))
    assert written["cuda"].keys() == written["cpu"].keys()
    for key, expected in written["cpu"].items():
        difference = (written["cuda"][key].float() - expected.float()).abs().max()
        assert difference <= 1e-3 * expected.float().abs().max(), key


def test_check_probe_on_cuda_agrees_with_the_cpu():
    def probe(device: str) -> dict:
        result = run_cli(
            "check",
            *(FIXTURES / name for name in ("chat-base", "chat-aligned", "chat-attack")),
            *("--harmful", PROMPTS / "harmful-calib.jsonl"),
            *("--refusal-patterns", PROMPTS / "refusal-phrases.txt"),
            *("--device", device, "--dtype", "float32", "--json"),
        )
        assert result.exit_code in (0, 12), result.stderr
        return json.loads(result.stdout)["check"]["probe"]

    on_gpu, on_cpu = probe("cuda"), probe("cpu")
    assert on_gpu["refused_by_aligned"] == on_cpu["refused_by_aligned"]
    assert on_gpu["flips"] == on_cpu["flips"]
    assert on_gpu["margin_drop"] == pytest.approx(on_cpu["margin_drop"], rel=1e-3)


def test_eval_with_a_device_map_on_one_gpu_agrees_with_the_device():
    """accelerate's placement path; on one GPU every layer lands on it (no multi-GPU split)."""
    pytest.importorskip("accelerate")

    def rates(*placement: str) -> list[float]:
        result = run_cli(
            "eval",
            FIXTURES / "chat-aligned",
            FIXTURES / "chat-attack",
            *("--harmful", PROMPTS / "harmful-eval.jsonl"),
            *("--refusal-patterns", PROMPTS / "refusal-phrases.txt"),
            *("--max-new-tokens", "24", *placement, "--dtype", "float32", "--json", "-q"),
        )
        assert result.exit_code == 0, result.stderr
        return [row["refusal"]["rate"] for row in json.loads(result.stdout)["rows"]]

    assert rates("--device-map", "auto") == pytest.approx(rates("--device", "cuda"), abs=0.02)


def test_a_classifier_judge_on_cuda_runs_there_and_gives_the_cpus_verdicts(tmp_path):
    from eval_models import save_classifier

    from adapter_fix.evaluate.judges import make_judge

    save_classifier(tmp_path / "random", ["compliance", "refusal"], seed=3)
    texts = [
        "i can not help with that",
        "sure here is how to make a cake",
        "tell me a story",
        "what is the capital of france paris paris paris",
        "no",
    ]
    judges = {
        device: make_judge(str(tmp_path / "random"), device=device, dtype="float32", batch_size=4)
        for device in ("cuda", "cpu")
    }
    assert next(judges["cuda"].model.parameters()).device.type == "cuda"
    verdicts = {device: judge.judge(texts, texts) for device, judge in judges.items()}
    # The detail holds the label and its probability: the same numbers, not only flags.
    assert [v.refusal for v in verdicts["cuda"]] == [v.refusal for v in verdicts["cpu"]]
    probabilities = {d: [float(v.detail.split()[-1]) for v in verdicts[d]] for d in verdicts}
    assert probabilities["cuda"] == pytest.approx(probabilities["cpu"], abs=0.011)
    assert len({v.detail for v in verdicts["cpu"]}) > 1  # the verdicts depend on the text


@pytest.mark.parametrize(("reply", "declined"), [("safe", True), ("unsafe", False)])
def test_a_guard_judge_on_cuda_runs_there_and_reads_its_reply(tmp_path, reply, declined):
    from eval_models import save_guard

    from adapter_fix.evaluate.judges import make_judge

    save_guard(tmp_path / "guard", reply)
    judge = make_judge(str(tmp_path / "guard"), device="cuda", dtype="float32", batch_size=2)
    assert next(judge.model.parameters()).device.type == "cuda"
    answers = ["i can not help with that", "sure here is how to make a cake", "tell me a story"]
    assert [v.refusal for v in judge.judge(answers, answers)] == [declined] * 3
