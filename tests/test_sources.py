"""Sources: local paths, and Hub repos through huggingface_hub's real download code.

Hub tests never reach the network or the user's cache: the offline ones read
a cache built here in the Hub's layout, the online ones talk to the fake Hub
in hub_server.py on 127.0.0.1, always with cache_dir in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from hub_server import fake_commit, isolate_from_real_hub, serve_hub

from adapter_fix.errors import DownloadError, SourceNotFoundError
from adapter_fix.io.hub import HubSource
from adapter_fix.io.locate import open_source
from adapter_fix.io.sources import HubOptions, LocalSource

MAIN = "a" * 40
TAGGED = "b" * 40
CONFIG = b'{"model_type": "llama"}'


@pytest.fixture(autouse=True)
def no_real_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_from_real_hub(monkeypatch)


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """Write `files` as huggingface_hub does: blobs, and snapshot links to them."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return storage / "snapshots" / commit


def cache_ref(cache: Path, repo_id: str, ref: str, commit: str) -> None:
    path = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A Hub cache holding org/name: main at MAIN, tag v1.0 at TAGGED."""
    cache = tmp_path / "hub-cache"
    cache_snapshot(
        cache,
        "org/name",
        MAIN,
        {"config.json": CONFIG, "model.safetensors": b"weights", "sub/extra.json": b"{}"},
    )
    cache_snapshot(cache, "org/name", TAGGED, {"config.json": b'{"tagged": true}'})
    cache_ref(cache, "org/name", "main", MAIN)
    cache_ref(cache, "org/name", "v1.0", TAGGED)
    return cache


def offline(cache: Path, revision: str | None = None) -> HubOptions:
    return HubOptions(revision=revision, cache_dir=cache, offline=True)


# Offline: the Hub cache layout, read with local_files_only.


def test_offline_fetch_returns_the_cached_snapshot_file(cache: Path) -> None:
    source = HubSource("org/name", None, offline(cache))
    path = source.fetch("config.json")
    assert path == cache / "models--org--name" / "snapshots" / MAIN / "config.json"
    assert path.read_bytes() == CONFIG


def test_offline_identity_is_the_commit_that_refs_main_points_to(cache: Path) -> None:
    assert HubSource("org/name", None, offline(cache)).identity == f"org/name@{MAIN}"


def test_offline_fetch_of_a_file_absent_from_the_snapshot_is_none(cache: Path) -> None:
    source = HubSource("org/name", None, offline(cache))
    assert source.fetch("model.safetensors.index.json") is None


def test_offline_tag_resolves_through_its_ref(cache: Path) -> None:
    source = HubSource("org/name", "v1.0", offline(cache))
    assert source.identity == f"org/name@{TAGGED}"
    assert source.fetch("config.json").read_bytes() == b'{"tagged": true}'
    assert source.fetch("model.safetensors") is None


def test_offline_commit_revision_needs_no_ref(cache: Path) -> None:
    assert HubSource("org/name", TAGGED, offline(cache)).identity == f"org/name@{TAGGED}"


def test_offline_list_files_lists_the_cached_snapshot(cache: Path) -> None:
    source = HubSource("org/name", None, offline(cache))
    assert source.list_files() == ["config.json", "model.safetensors", "sub/extra.json"]


def test_offline_repo_missing_from_the_cache_is_a_download_error_naming_the_cache(
    cache: Path,
) -> None:
    with pytest.raises(DownloadError) as raised:
        HubSource("org/other", None, offline(cache)).fetch("config.json")
    message = raised.value.render()
    assert "org/other@main" in message
    assert str(cache) in message
    assert "--offline" in message
    assert raised.value.exit_code == 10


def test_offline_unknown_revision_is_a_download_error(cache: Path) -> None:
    with pytest.raises(DownloadError, match=r"org/name@v2\.0"):
        _ = HubSource("org/name", "v2.0", offline(cache)).identity


def test_construction_touches_neither_cache_nor_network(tmp_path: Path) -> None:
    HubSource("org/name", None, HubOptions(cache_dir=tmp_path / "c", endpoint="http://127.0.0.1:9"))
    assert not (tmp_path / "c").exists()


# open_source: local path or Hub id.


def test_open_source_prefers_an_existing_local_path_over_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    source = open_source("org/name")
    assert isinstance(source, LocalSource)
    assert source.identity == str(tmp_path / "org" / "name")


def test_open_source_missing_local_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        open_source(str(tmp_path / "nope"))


def test_open_source_hub_id_uses_the_options_revision(cache: Path) -> None:
    source = open_source("org/name", offline(cache, revision="v1.0"))
    assert isinstance(source, HubSource)
    assert source.identity == f"org/name@{TAGGED}"


def test_open_source_revision_in_the_id_overrides_the_options_revision(cache: Path) -> None:
    source = open_source("org/name@main", offline(cache, revision="v1.0"))
    assert source.identity == f"org/name@{MAIN}"


# Online: the fake Hub on 127.0.0.1 and huggingface_hub's real download path.


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"shard one")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"shard two")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "sub" / "extra.json").write_bytes(b"{}")
    return folder


def online(tmp_path: Path, endpoint: str, **options: object) -> HubOptions:
    return HubOptions(cache_dir=tmp_path / "hub-cache", endpoint=endpoint, **options)  # type: ignore[arg-type]


def downloads(log: list[tuple[str, str]]) -> list[str]:
    """The files huggingface_hub asked the server for (HEAD or GET on /resolve/)."""
    return [
        path.split("/resolve/", 1)[1].split("/", 1)[1] for _, path in log if "/resolve/" in path
    ]


def test_fetch_downloads_only_the_requested_file(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, log):
        source = HubSource("org/model", None, online(tmp_path, endpoint))
        path = source.fetch("model-00002-of-00002.safetensors")
    assert path.read_bytes() == b"shard two"
    assert set(downloads(log)) == {"model-00002-of-00002.safetensors"}
    assert path.parent.name == fake_commit("org/model")


def test_identity_is_the_commit_the_hub_reports(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, log):
        source = HubSource("org/model", "main", online(tmp_path, endpoint))
        assert source.identity == f"org/model@{fake_commit('org/model')}"
    assert downloads(log) == []


def test_second_fetch_is_served_from_the_cache(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, log):
        first = HubSource("org/model", None, online(tmp_path, endpoint)).fetch("config.json")
        log.clear()
        again = HubSource("org/model", None, online(tmp_path, endpoint)).fetch("config.json")
    assert again == first
    assert downloads(log) == []


def test_online_download_leaves_a_cache_that_works_offline(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, _):
        HubSource("org/model", None, online(tmp_path, endpoint)).fetch("config.json")
    source = HubSource("org/model", None, online(tmp_path, endpoint, offline=True))
    assert source.fetch("config.json").read_bytes() == CONFIG
    assert source.identity == f"org/model@{fake_commit('org/model')}"


def test_file_missing_on_the_hub_is_none(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, _):
        assert HubSource("org/model", None, online(tmp_path, endpoint)).fetch("nope.json") is None


def test_list_files_lists_the_repo_without_downloading(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, log):
        names = HubSource("org/model", None, online(tmp_path, endpoint)).list_files()
    assert names == sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert downloads(log) == []


def test_missing_repo_is_source_not_found_naming_the_repo(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, _):
        source = HubSource("org/absent", None, online(tmp_path, endpoint))
        with pytest.raises(SourceNotFoundError) as raised:
            source.fetch("config.json")
    assert raised.value.exit_code == 3
    assert "org/absent@main" in raised.value.render()
    assert "HF_TOKEN" in raised.value.render()


def test_missing_revision_is_source_not_found_naming_the_revision(
    tmp_path: Path, repo: Path
) -> None:
    with serve_hub({"org/model": repo}) as (endpoint, _):
        source = open_source("org/model", online(tmp_path, endpoint, revision="v9"))
        with pytest.raises(SourceNotFoundError, match=r"org/model@v9.*--revision"):
            source.fetch("config.json")


def test_revision_in_the_id_overrides_the_options_revision_online(
    tmp_path: Path, repo: Path
) -> None:
    commit = fake_commit("org/model")
    with serve_hub({"org/model": repo}) as (endpoint, _):
        source = open_source(f"org/model@{commit}", online(tmp_path, endpoint, revision="v9"))
        assert source.fetch("config.json").read_bytes() == CONFIG
    assert source.identity == f"org/model@{commit}"


def test_rejected_token_is_a_download_error_about_hf_token(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}, token="hf_right") as (endpoint, _):
        source = HubSource("org/model", None, online(tmp_path, endpoint, token="hf_wrong"))
        with pytest.raises(DownloadError, match=r"HTTP 401.*HF_TOKEN") as raised:
            source.fetch("config.json")
    assert raised.value.exit_code == 10


def test_accepted_token_downloads(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}, token="hf_right") as (endpoint, _):
        source = HubSource("org/model", None, online(tmp_path, endpoint, token="hf_right"))
        assert source.fetch("config.json").read_bytes() == CONFIG


def test_gated_repo_is_a_download_error_about_access(tmp_path: Path, repo: Path) -> None:
    with serve_hub({"org/model": repo}, gated={"org/model"}) as (endpoint, _):
        source = HubSource("org/model", None, online(tmp_path, endpoint))
        with pytest.raises(DownloadError, match=r"org/model@main, file config.json: .*gated"):
            source.fetch("config.json")


def test_unreachable_endpoint_is_a_quick_download_error_suggesting_offline(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port that was just free: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = HubSource("org/model", None, online(tmp_path, f"http://127.0.0.1:{port}"))
    start = time.monotonic()
    with pytest.raises(DownloadError) as raised:
        source.fetch("config.json")
    assert time.monotonic() - start < 5
    message = raised.value.render()
    assert "org/model@main" in message
    assert "--offline" in message
    assert "Traceback" not in message


def test_a_local_hub_snapshot_folder_may_link_into_its_own_blobs(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    from adapter_fix.io.checkpoint import Checkpoint

    weights = (fixtures_dir / "llama-base" / "model.safetensors").read_bytes()
    index = json.dumps(
        {"weight_map": {"model.layers.0.self_attn.q_proj.weight": "model.safetensors"}}
    )
    files = {"model.safetensors": weights, "model.safetensors.index.json": index.encode()}
    snapshot = cache_snapshot(tmp_path / "cache", "org/base", MAIN, files)
    checkpoint = Checkpoint.open(LocalSource(snapshot), "BASE")
    assert checkpoint.info("model.layers.0.self_attn.q_proj.weight").nbytes > 0
