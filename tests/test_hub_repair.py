"""`repair` and `inspect` on Hub ids, served by a local Hub on 127.0.0.1: only needed files move."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hub_server import fake_commit, isolate_from_real_hub, serve_hub
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_from_real_hub(monkeypatch)


def test_repair_from_the_hub_downloads_only_what_it_reads(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(fixtures_dir / "llama-base", base)
    (base / "pytorch_model.bin").write_bytes(b"a pickle twin that must never be fetched")
    (base / "optimizer.pt").write_bytes(b"never fetched either")
    repos = {
        "org/base": base,
        "org/aligned": fixtures_dir / "llama-aligned",
        "org/lora": fixtures_dir / "llama-lora",
    }
    cache = tmp_path / "cache"
    with serve_hub(repos) as (endpoint, log):
        args = ["--endpoint", endpoint, "--cache-dir", str(cache)]
        result = run_cli(
            "repair",
            "org/base",
            "org/aligned@main",
            "org/lora",
            "-o",
            str(tmp_path / "out"),
            "-q",
            *args,
        )
        assert result.exit_code == 0, result.stderr
        downloads = {path for method, path in log if method == "GET" and "/resolve/" in path}
    fetched = {path.rsplit("/", 1)[-1] for path in downloads}
    assert "pytorch_model.bin" not in fetched and "optimizer.pt" not in fetched
    assert "model.safetensors.index.json" in fetched
    assert {"adapter_config.json", "adapter_model.safetensors"} <= fetched
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["adapter_fix.aligned"] == f"org/aligned@{fake_commit('org/aligned')}"

    local = tmp_path / "local"
    code = run_cli(
        "repair",
        str(base),
        str(fixtures_dir / "llama-aligned"),
        str(fixtures_dir / "llama-lora"),
        "-o",
        str(local),
        "-q",
    ).exit_code
    assert code == 0
    hub_tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    local_tensors = load_file(local / "adapter_model.safetensors")
    assert all(torch.equal(hub_tensors[k], local_tensors[k]) for k in local_tensors)


def test_inspect_works_offline_from_the_cache_after_one_online_run(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with serve_hub({"org/lora": fixtures_dir / "llama-lora"}) as (endpoint, _):
        online = run_cli(
            "inspect", "org/lora", "--json", "--endpoint", endpoint, "--cache-dir", str(cache)
        )
    assert online.exit_code == 0, online.stderr
    offline = run_cli("inspect", "org/lora", "--json", "--offline", "--cache-dir", str(cache))
    assert offline.exit_code == 0, offline.stderr
    assert json.loads(offline.stdout)["modules"] == json.loads(online.stdout)["modules"]


def test_unknown_hub_repo_exits_3_without_traceback(fixtures_dir: Path, tmp_path: Path) -> None:
    with serve_hub({"org/lora": fixtures_dir / "llama-lora"}) as (endpoint, _):
        result = run_cli(
            "inspect", "org/missing", "--endpoint", endpoint, "--cache-dir", str(tmp_path)
        )
    assert result.exit_code == 3
    assert "org/missing" in result.stderr and "Traceback" not in result.stderr
