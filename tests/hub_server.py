"""A tiny Hugging Face Hub on 127.0.0.1: just enough protocol for huggingface_hub's downloads.

`serve_hub({"org/name": folder})` serves each folder as a model repo whose
only branch is `main`, at a fixed fake commit (`fake_commit(repo_id)`); a key
`datasets/org/name` serves a dataset repo (under /datasets/ and /api/datasets/).
Routes, as huggingface_hub requests them:

    HEAD/GET /{repo}/resolve/{revision}/{path}   hf_hub_download (plain HTTP, never Xet)
    GET /api/models/{repo}[/revision/{revision}] model_info
    GET /api/models/{repo}/tree/{revision}       list_repo_files (?recursive=True)

Errors carry the Hub's `X-Error-Code` headers (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo), so huggingface_hub raises its usual exceptions.
Every request is recorded as (method, path) in the log the context yields.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

RequestLog = list[tuple[str, str]]


def fake_commit(repo_id: str) -> str:
    """The commit sha the server reports for `repo_id` (stable across runs)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def isolate_from_real_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep huggingface_hub away from the user's saved token, OIDC and telemetry.

    A set HF_TOKEN is read before the token file; the fake Hub ignores it
    unless started with `token=`.
    """
    monkeypatch.setenv("HF_TOKEN", "hf_test_environment_token")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


class _Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, Path], token: str | None, gated: Collection[str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.token = token
        self.gated = set(gated)
        self.log: RequestLog = []


class _Handler(BaseHTTPRequestHandler):
    server: _Hub
    timeout = 10  # a stuck client cannot hold a server thread for longer

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def do_GET(self) -> None:
        self._route(send_body=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request log is the record; keep pytest output clean

    def _route(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        self.server.log.append((self.command, unquote(url.path)))
        # Split the raw path: a revision such as refs/pr/1 arrives as one %2F-quoted segment.
        parts = [unquote(part) for part in url.path.split("/")[1:]]
        # Dataset repos are served from keys "datasets/org/name" of `repos`.
        kind = ""
        if parts[:1] == ["datasets"] or parts[:2] == ["api", "datasets"]:
            kind = "datasets/"
            parts = ["api", "models", *parts[2:]] if parts[0] == "api" else parts[1:]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = kind + "/".join(parts[2:4]), parts[4:]
            if not rest or (rest[0] == "revision" and len(rest) == 2):
                self._model_info(repo_id, rest[1] if rest else "main", send_body)
            elif rest[0] == "tree" and len(rest) >= 2:
                recursive = parse_qs(url.query).get("recursive", [""])[0].lower() == "true"
                self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive, send_body)
            else:
                self._error(404, None, "Not found", send_body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(kind + "/".join(parts[:2]), parts[3], "/".join(parts[4:]), send_body)
        else:
            self._error(404, None, "Not found", send_body)

    def _repo(self, repo_id: str, revision: str, send_body: bool) -> Path | None:
        """The repo's folder, or None after sending the Hub's error for auth, repo or revision."""
        given = self.headers.get("Authorization")
        if self.server.token is not None and given != f"Bearer {self.server.token}":
            if given is None:  # the Hub hides private repos from anonymous users
                self._error(401, "RepoNotFound", "Repository not found", send_body)
            else:
                self._error(401, None, "Invalid credentials in Authorization header", send_body)
            return None
        folder = self.server.repos.get(repo_id)
        if folder is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return None
        if revision not in ("main", fake_commit(repo_id)):
            self._error(404, "RevisionNotFound", "Invalid rev id", send_body, repo_id)
            return None
        return folder

    def _model_info(self, repo_id: str, revision: str, send_body: bool) -> None:
        folder = self._repo(repo_id, revision, send_body)
        if folder is not None:
            siblings = [{"rfilename": name} for name in _files(folder)]
            info = {"id": repo_id, "sha": fake_commit(repo_id), "private": False}
            self._json(
                {**info, "gated": repo_id in self.server.gated, "siblings": siblings}, send_body
            )

    def _tree(
        self, repo_id: str, revision: str, under: str, recursive: bool, send_body: bool
    ) -> None:
        folder = self._repo(repo_id, revision, send_body)
        if folder is None:
            return
        prefix = f"{under}/" if under else ""
        entries, folders = [], set()
        for name in _files(folder):
            if not name.startswith(prefix):
                continue
            inner = name[len(prefix) :]
            if recursive or "/" not in inner:
                size = (folder / name).stat().st_size
                entries.append({"type": "file", "path": name, "size": size, "oid": _oid(name)})
            else:
                folders.add(prefix + inner.split("/")[0])
        entries += [{"type": "directory", "path": p, "oid": _oid(p), "size": 0} for p in folders]
        self._json(entries, send_body)

    def _resolve(self, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        folder = self._repo(repo_id, revision, send_body)
        if folder is None:
            return
        if repo_id in self.server.gated:
            message = f"Access to model {repo_id} is restricted."
            self._error(403, "GatedRepo", message, send_body, repo_id)
            return
        path = (folder / filename).resolve()
        if not path.is_file() or not path.is_relative_to(folder.resolve()):
            self._error(404, "EntryNotFound", "Entry not found", send_body, repo_id)
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", fake_commit(repo_id))
        self.send_header("ETag", f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"')
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if send_body:
            with path.open("rb") as f:
                shutil.copyfileobj(f, self.wfile)

    def _json(self, payload: object, send_body: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        send_body: bool,
        repo_id: str | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if repo_id is not None:
            self.send_header("X-Repo-Commit", fake_commit(repo_id))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _oid(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


@contextmanager
def serve_hub(
    repos: dict[str, Path], *, token: str | None = None, gated: Collection[str] = ()
) -> Iterator[tuple[str, RequestLog]]:
    """Serve `repos` (repo id -> folder) on an ephemeral port; yield (endpoint, request log).

    token: when set, requests must send it (`Authorization: Bearer`); none gets 401
        RepoNotFound, another gets 401 "Invalid credentials", as on the Hub.
    gated: repo ids whose files answer 403 GatedRepo (their metadata stays readable).
    """
    hub = _Hub(repos, token, gated)
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{hub.server_address[1]}", hub.log
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)
