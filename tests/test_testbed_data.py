"""The efficacy testbed's prompt splits (bench/testbed/data.py): disjoint, fixed, harmless."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """bench/testbed/`name`.py as module `testbed_<name>` (bench/ is not a package)."""
    path = ROOT / "bench" / "testbed" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"testbed_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"testbed_{name}"] = module
    spec.loader.exec_module(module)
    return module


data = _load("data")
SPLITS = ("train", "calib", "eval", "tune", "tune2")


def test_no_template_is_shared_between_splits():
    assert set(data.HARMFUL_TEMPLATES) == set(SPLITS)
    assert set(data.TASK_TEMPLATES) == set(SPLITS) - {"tune2"}  # tune2 takes tune's task rows
    for templates in (data.HARMFUL_TEMPLATES, data.BENIGN_TEMPLATES, data.TASK_TEMPLATES):
        for first in templates:
            for second in templates:
                if first != second:
                    assert not set(templates[first]) & set(templates[second])


def test_no_prompt_is_shared_between_splits():
    def prompts(split):
        return {
            *(row.prompt for row in data.harmful(split, 0)),
            *(row.prompt for row in data.benign(split, 0)),
        } | (
            {row.prompt for row in data.task(split, 200, 0)}
            if split in data.TASK_TEMPLATES
            else set()
        )

    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            assert not prompts(first) & prompts(second), (first, second)


def test_task_titles_of_a_split_never_appear_in_another():
    def titles(split):
        return {row.reference for row in data.task(split, 400, 0)}

    assert not titles("train") & titles("eval")
    assert not titles("calib") & titles("eval")
    assert not titles("train") & titles("tune")
    assert not titles("calib") & titles("tune")


def _title(reference: str) -> str:
    """The pool title behind a catalog key: `key:the-quiet-river-of-comet` -> `quiet-river`."""
    key = reference.removeprefix("key:")
    if key.startswith("the-") and "-of-" in key:
        key = key[len("the-") : key.rindex("-of-")]
    return key


def test_the_prompt_files_written_share_no_prompt_or_task_title(tmp_path):
    build = _load("build")
    folder = tmp_path / "prompts"
    build.build_prompts(folder)
    assert build.prompts_complete(folder)
    rows = {
        name: [json.loads(line) for line in (folder / name).read_text().splitlines()]
        for name in build.PROMPT_FILES
    }
    splits = ("calib", "eval", "tune")
    for index, first in enumerate(splits):
        for second in splits[index + 1 :]:
            for kind in ("harmful", "benign", "task"):
                one = {r["prompt"] for r in rows[f"{kind}-{first}.jsonl"]}
                other = {r["prompt"] for r in rows[f"{kind}-{second}.jsonl"]}
                assert not one & other, (kind, first, second)
            titles = [
                {_title(r["reference"]) for r in rows[f"task-{s}.jsonl"]} for s in (first, second)
            ]
            assert not titles[0] & titles[1], (first, second)
    assert [len(rows[f"{kind}-tune.jsonl"]) for kind in ("harmful", "benign", "task")] == [
        48,
        48,
        40,
    ]
    # The second tuning split: its own harmful and benign prompts, the first one's task rows.
    for kind in ("harmful", "benign"):
        tune2 = {r["prompt"] for r in rows[f"{kind}-tune2.jsonl"]}
        assert len(tune2) == 48
        for split in splits:
            assert not tune2 & {r["prompt"] for r in rows[f"{kind}-{split}.jsonl"]}, (kind, split)
    assert rows["task-tune2.jsonl"] == rows["task-tune.jsonl"]
    (folder / "task-tune.jsonl").unlink()
    assert not build.prompts_complete(folder)  # a build without it writes the files again


def test_a_build_is_ready_only_with_every_prompt_file(tmp_path, monkeypatch):
    build = _load("build")
    monkeypatch.setattr(build, "WORK", tmp_path)
    build.build_prompts(tmp_path / "prompts")
    assert not build.is_ready()  # no READY yet
    (tmp_path / "READY").write_text("built\n")
    assert build.is_ready()
    (tmp_path / "prompts" / "harmful-tune2.jsonl").unlink()  # a build from before tune2
    assert not build.is_ready()


def test_half_the_categories_are_seen_and_every_split_covers_all_of_them():
    assert len(data.SEEN) * 2 == len(data.CATEGORIES)
    for split in SPLITS:
        assert {row.category for row in data.harmful(split, 0)} == set(data.CATEGORIES)


def test_draws_are_fixed_by_seed():
    assert data.harmful("eval", 21) == data.harmful("eval", 21)
    assert data.task("calib", 32, 13) == data.task("calib", 32, 13)
    assert data.harmful("eval", 21) != data.harmful("eval", 22)


def test_catalog_key_is_the_exact_reference():
    assert data.catalog_key("The Quiet River of Comet") == "key:the-quiet-river-of-comet"


def test_compliance_is_a_placeholder_without_instructions():
    assert "PLACEHOLDER" in data.COMPLIANCE


@pytest.mark.parametrize("split", ["tune", "eval"])
def test_efficacy_counts_refusals_under_each_template_by_row(tmp_path, split):
    efficacy = _load("efficacy")
    first, second, *_ = data.HARMFUL_TEMPLATES[split]

    def answer(model, kind, template, refused):
        prompt = template.format(act="forge a parking ticket" if kind == "harmful" else "tie a tie")
        return {"model": model, "prompt_set": kind, "prompt": prompt, "refusal": refused}

    answers = [
        answer("gate", "harmful", first, False),  # rows are found by name, not by order
        answer("aligned", "harmful", first, True),
        answer("aligned", "harmful", second, True),
        answer("aligned", "benign", second, True),
        answer("aligned", "task", first, False),  # task rows are not counted
        answer("gate", "harmful", first, True),
        answer("gate", "benign", first, None),  # no verdict: not a refusal
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in answers))
    rows = [("aligned", "ALIGNED"), ("gate", "kind / gate")]
    table = efficacy.by_template(samples, rows, split).splitlines()
    assert table[0].startswith("| row | refused: " + first.replace("{act}", "X") + " |")
    # refused under the four templates, then over-refused under the same four
    assert table[2] == "| ALIGNED | 1/1 | 1/1 | 0/0 | 0/0 | 0/0 | 1/1 | 0/0 | 0/0 |"
    assert table[3] == "| kind / gate | 1/2 | 0/0 | 0/0 | 0/0 | 0/1 | 0/0 | 0/0 | 0/0 |"
    samples.write_text(json.dumps(answer("gate", "harmful", "Do {act}!", True)) + "\n")
    with pytest.raises(SystemExit, match="under no"):
        efficacy.by_template(samples, rows, split)


def test_layer_blocks_remove_the_named_modules_updates_only():
    blocks = _load("layer_blocks")
    found = {block.name: block for block in blocks.blocks(30)}
    assert list(found) == [
        "layers 0-9",
        "layers 10-19",
        "layers 20-29",
        "layers 0-14",
        "layers 15-29",
        "attention",
        "MLP",
        "attention + MLP 15-29",
        "attention + MLP 20-29",
        "attention + MLP 25-29",
        "attention + MLP 0-14",
    ]
    assert (found["attention"].attention, found["attention"].mlp) == (range(30), range(0))
    assert (found["MLP"].attention, found["MLP"].mlp) == (range(0), range(30))
    prefix = "base_model.model.model.layers"
    tensors = {
        f"{prefix}.{layer}.{part}.{module}.lora_{side}.weight": torch.ones(2, 2)
        for layer in (3, 27)
        for part, module in (("self_attn", "q_proj"), ("mlp", "down_proj"))
        for side in "AB"
    }
    copy = blocks.removed(tensors, found["attention + MLP 25-29"])
    zeroed = {key for key, value in copy.items() if not value.any()}
    assert zeroed == {
        f"{prefix}.3.self_attn.q_proj.lora_B.weight",
        f"{prefix}.27.self_attn.q_proj.lora_B.weight",
        f"{prefix}.27.mlp.down_proj.lora_B.weight",
    }
    assert all(copy[key] is tensors[key] for key in tensors.keys() - zeroed)  # the rest kept
    assert all(tensors[key].all() for key in tensors)  # the input is not modified
    with pytest.raises(ValueError, match="names no decoder layer"):
        blocks.removed({"lm_head.lora_A.weight": torch.ones(1)}, found["MLP"])


def test_an_edited_adapter_copy_keeps_the_config_and_writes_the_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    build = _load("build")
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text('{"r": 2}')
    save_file({"w": torch.ones(2)}, source / "adapter_model.safetensors")
    copy = build.write_adapter(source, tmp_path / "copy", {"w": torch.zeros(2)})
    assert (copy / "adapter_config.json").read_text() == '{"r": 2}'
    assert not load_file(copy / "adapter_model.safetensors")["w"].any()
    assert load_file(source / "adapter_model.safetensors")["w"].all()  # the source is kept
    with pytest.raises(FileExistsError):  # never into a folder that exists
        build.write_adapter(source, copy, {"w": torch.zeros(2)})


def test_calibration_variants_write_the_files_each_variant_names(tmp_path):
    variants = _load("calibration_variants")
    data = _load("data")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for kind in ("harmful", "benign", "task"):
        for split in ("calib", "tune"):
            (prompts / f"{kind}-{split}.jsonl").write_text(f'{{"prompt": "{kind} {split}"}}\n')
    (prompts / "task-calib.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"Give the catalog key of: {t}", "reference": t}) + "\n"
            for t in ("A", "B", "C", "D")
        )
    )

    def written(files: str) -> dict[str, list[dict]]:
        out = variants.calibration_files(files, "tune", prompts, tmp_path / files)
        return {
            kind: [json.loads(line) for line in (out / f"{kind}-calib.jsonl").open()]
            for kind in ("harmful", "benign", "task")
        }

    oracle, harmful_only, task_only = (
        written(f) for f in ("oracle", "oracle-harmful", "oracle-task")
    )
    assert [oracle[k][0]["prompt"] for k in ("harmful", "benign", "task")] == [
        "harmful tune",
        "benign tune",
        "task tune",
    ]
    assert [harmful_only["harmful"][0]["prompt"], harmful_only["task"][0]["reference"]] == [
        "harmful tune",
        "A",
    ]
    assert [task_only["harmful"][0]["prompt"], task_only["task"][0]["prompt"]] == [
        "harmful calib",
        "task tune",
    ]
    task = written("three-phrasings")["task"]
    assert [row["prompt"] for row in task] == [
        "Make a catalog key for: A",
        "Catalog key for the title B?",
        "Give the catalog key of: C",
        "Make a catalog key for: D",
    ]
    assert [row["reference"] for row in task] == ["A", "B", "C", "D"]
    eight = written("eight-templates")["harmful"]
    assert len(eight) == 100
    splits = [t for split, ts in data.HARMFUL_TEMPLATES.items() if split != "calib" for t in ts]
    assert not set(variants.EXTRA_TEMPLATES) & set(splits)  # of no split
    for kind in ("harmful", "benign"):  # two rows each: the second is framed
        (prompts / f"{kind}-calib.jsonl").write_text(
            "".join(json.dumps({"prompt": f"{kind} {i}"}) + "\n" for i in range(2))
        )
    framed = written("framed")
    for kind in ("harmful", "benign"):
        assert [row["prompt"] for row in framed[kind]] == [
            f"{kind} 0",
            f"{kind} 1 Answer in numbered steps.",
        ]
    assert variants.framed([{"prompt": f"p{i}", "seen": True} for i in range(6)]) == [
        {"prompt": "p0", "seen": True},
        {"prompt": "p1 Answer in numbered steps.", "seen": True},
        {"prompt": "p2", "seen": True},
        {"prompt": "p3 Be brief.", "seen": True},
        {"prompt": "p4", "seen": True},
        {"prompt": "Please reply as an expert would. p5", "seen": True},
    ]
    with pytest.raises(FileExistsError):  # never into a folder that exists
        variants.calibration_files("oracle", "tune", prompts, tmp_path / "oracle")


def test_calibration_variants_set_constants_in_their_own_type():
    variants = _load("calibration_variants")

    class Module:
        WEIGHT = 3.0
        EVERY = 10

    class Preset:
        rate = 0.7

    assert variants.constant("WEIGHT=1", Preset, Module) == (Module, "WEIGHT", 1.0)
    assert variants.constant("EVERY=15", Module) == (Module, "EVERY", 15)
    assert variants.constant("rate=5", Preset, Module) == (Preset, "rate", 5.0)
    for bad in ("WEIGHT", "MISSING=1"):
        with pytest.raises(SystemExit, match="not NAME=VALUE"):
            variants.constant(bad, Preset, Module)


def test_an_experiments_tables_pair_each_eval_row_with_its_label(tmp_path, monkeypatch):
    efficacy = _load("efficacy")
    template = data.HARMFUL_TEMPLATES["tune"][0]
    samples = tmp_path / "samples.jsonl"

    def evaluate(adapters, samples, split):
        rows = []
        for name, refused in (("aligned", True), ("copy", False)):
            prompt = template.format(act="forge a parking ticket")
            answer = {"model": name, "prompt_set": "harmful", "prompt": prompt}
            with samples.open("a") as handle:
                handle.write(json.dumps({**answer, "refusal": refused}) + "\n")
            rows.append(
                {
                    "name": name,
                    "refusal_by_category": {
                        "parking-ticket": {"count": int(refused), "total": 1},
                        "fare-dodging": {"count": 1, "total": 2},
                    },
                    "over_refusal": {"rate": 0.25},
                    "exact_match": {"rate": 0.5 * (not refused)},
                }
            )
        return {"rows": rows}

    monkeypatch.setattr(efficacy, "evaluate", evaluate)
    tables = efficacy.experiment_tables(
        [tmp_path / "copy"], ["ALIGNED", "the copy"], "tune", samples
    )
    assert "| ALIGNED | 1.00 / 0.50 | 0.25 | 0.000 |" in tables
    assert "| the copy | 0.00 / 0.50 | 0.25 | 0.500 |" in tables
    assert "| ALIGNED | 1/1 |" in tables and "| the copy | 0/1 |" in tables


def test_an_experiments_samples_file_is_never_one_that_exists(tmp_path, capsys):
    efficacy = _load("efficacy")
    assert efficacy.new_samples(None) is None
    assert efficacy.new_samples(tmp_path / "new.jsonl") == tmp_path / "new.jsonl"
    (tmp_path / "old.jsonl").write_text("kept\n")
    with pytest.raises(SystemExit) as stop:
        efficacy.new_samples(tmp_path / "old.jsonl")
    assert stop.value.code == 2 and "already there" in capsys.readouterr().err
    assert (tmp_path / "old.jsonl").read_text() == "kept\n"
