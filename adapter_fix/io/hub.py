"""Hugging Face Hub repos as a `Source`: one file downloaded at a time, pinned to one commit.

The revision (branch, tag or commit) is resolved to a commit once, on first
use, and every download is pinned to that commit, so a branch that moves
mid-run cannot mix shards of two commits, and files already in the cache are
served without a request. `fetch` downloads exactly the file it is asked for;
nothing here filters names, because callers only ask for `.json` and
`.safetensors` files and only list names (never fetch) to detect pickles.

Every huggingface_hub failure becomes a `SourceNotFoundError` (exit 3) or a
`DownloadError` (exit 10) whose message names the repo, the revision and the
file, and says what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from adapter_fix import __version__
from adapter_fix.errors import AdapterFixError, DownloadError, SourceNotFoundError
from adapter_fix.io.sources import HubOptions, Source

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_REVISION = "main"
LOGIN_HINT = "set HF_TOKEN to a token with read access to it (or run `hf auth login`)"


class HubSource(Source):
    """A model or adapter repo on the Hub, `org/name` at `revision` (None: the default branch).

    Construction makes no request. The commit is resolved on first use:
    online with one `model_info` call (the ref is then written to the cache
    so `--offline` works later), offline from the cache's `refs/<revision>`.
    """

    def __init__(
        self,
        repo_id: str,
        revision: str | None,
        options: HubOptions,
        repo_type: str = "model",
    ) -> None:
        self.repo_id = repo_id
        self.repo_type = repo_type  # "dataset" for prompt sets (eval)
        self.revision = revision
        self.options = options
        self.cache_dir = (
            Path(options.cache_dir).expanduser()
            if options.cache_dir is not None
            else Path(constants.HF_HUB_CACHE)
        )
        self.endpoint = (options.endpoint or constants.ENDPOINT).rstrip("/")
        self._commit: str | None = None
        self._fetched: dict[str, Path | None] = {}

    @property
    def requested(self) -> str:
        """The repo and revision as the user asked for them: `org/name@main`."""
        return f"{self.repo_id}@{self.revision or DEFAULT_REVISION}"

    @property
    def commit(self) -> str:
        """The 40-hex commit the revision points to, resolved once."""
        return self._resolved()

    @property
    def identity(self) -> str:  # type: ignore[override]
        return f"{self.repo_id}@{self.commit}"

    @property
    def storage(self) -> Path:
        """This repo's folder in the Hub cache (`models--org--name`)."""
        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type=self.repo_type)

    @property
    def local_paths(self) -> list[Path]:
        return [self.storage]

    def fetch(self, filename: str) -> Path | None:
        if filename not in self._fetched:
            self._fetched[filename] = self._download(filename)
        return self._fetched[filename]

    def list_files(self) -> list[str]:
        if self.options.offline:
            snapshot = self.storage / "snapshots" / self.commit
            # Offline, the repo is what the cache holds; broken links (pruned blobs) are skipped.
            return sorted(
                p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
            )
        commit = self.commit
        with self._hub_errors():
            return sorted(
                self._api().list_repo_files(self.repo_id, revision=commit, repo_type=self.repo_type)
            )

    def _download(self, filename: str) -> Path | None:
        commit = self._resolved(filename)
        with self._hub_errors(filename):
            try:
                return Path(
                    hf_hub_download(
                        self.repo_id,
                        filename,
                        repo_type=self.repo_type,
                        revision=commit,
                        cache_dir=self.cache_dir,
                        local_files_only=self.options.offline,
                        endpoint=self.options.endpoint,
                        token=self.options.token,
                        library_name="adapter-fix",
                        library_version=__version__,
                    )
                )
            except LocalEntryNotFoundError:
                if self.options.offline:
                    return None  # offline, a file absent from the cached snapshot is absent
                raise
            except EntryNotFoundError:
                return None

    def _resolved(self, filename: str | None = None) -> str:
        """The commit; `filename`, when resolving for a fetch, is named in errors."""
        if self._commit is None:
            if self.options.offline:
                self._commit = self._resolve_offline(filename)
            else:
                self._commit = self._resolve(filename)
        return self._commit

    def _resolve(self, filename: str | None) -> str:
        if self.revision is not None and COMMIT_SHA.match(self.revision):
            return self.revision
        with self._hub_errors(filename):
            # HfApi calls default to no timeout: a firewall that drops packets would hang the run.
            info = self._api().repo_info(
                self.repo_id,
                revision=self.revision,
                repo_type=self.repo_type,
                timeout=constants.HF_HUB_ETAG_TIMEOUT,
            )
        if not info.sha:
            raise DownloadError(
                f"{self._where(filename)}: {self.endpoint} answered without a commit sha, so "
                "it does not look like a Hugging Face Hub. Check --endpoint and HF_ENDPOINT."
            )
        self._remember_ref(info.sha)
        return info.sha

    def _remember_ref(self, commit: str) -> None:
        """Record revision -> commit in the cache as huggingface_hub does, so --offline finds it."""
        ref = self.storage / "refs" / (self.revision or DEFAULT_REVISION)
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
        except OSError:
            pass  # a read-only cache still serves this run; only a later --offline run needs it

    def _resolve_offline(self, filename: str | None) -> str:
        revision = self.revision or DEFAULT_REVISION
        ref = self.storage / "refs" / revision
        if COMMIT_SHA.match(revision):
            commit = revision
        elif ref.is_file():
            commit = ref.read_text().strip()
        else:
            raise self._not_cached(filename)
        if not (self.storage / "snapshots" / commit).is_dir():
            raise self._not_cached(filename)
        return commit

    def _not_cached(self, filename: str | None) -> DownloadError:
        return DownloadError(
            f"{self._where(filename)}: not in the Hub cache at {self.cache_dir}, and "
            "--offline forbids downloading it. Run once without --offline to download it, "
            "or point --cache-dir at the cache that holds it."
        )

    def _api(self) -> HfApi:
        return HfApi(
            endpoint=self.options.endpoint,
            token=self.options.token,
            library_name="adapter-fix",
            library_version=__version__,
        )

    @contextmanager
    def _hub_errors(self, filename: str | None = None) -> Iterator[None]:
        """Turn huggingface_hub's exceptions into one-paragraph adapter-fix errors."""
        try:
            yield
        except AdapterFixError:
            raise
        except Exception as error:
            raise self._translate(error, self._where(filename)) from None

    def _where(self, filename: str | None) -> str:
        return f"Hub repo {self.requested}" + (f", file {filename}" if filename else "")

    def _translate(self, error: Exception, where: str) -> AdapterFixError:
        if isinstance(error, LocalEntryNotFoundError) and isinstance(
            error.__cause__, HfHubHTTPError
        ):
            error = error.__cause__  # hf_hub_download wraps an HTTP refusal it could not bypass
        if isinstance(error, RevisionNotFoundError):
            return SourceNotFoundError(
                f"{where}: no revision {self.revision!r} (branch, tag or commit) in this repo. "
                "Check --revision or the @revision in the id."
            )
        if isinstance(error, GatedRepoError):
            return DownloadError(
                f"{where}: the repo is gated. Accept its terms on {self.endpoint}/{self.repo_id}, "
                f"then {LOGIN_HINT}."
            )
        if isinstance(error, RepositoryNotFoundError):
            return SourceNotFoundError(
                f"{where}: no such repo on {self.endpoint}. Check the id (org/name) and "
                f"--revision; if the repo is private, {LOGIN_HINT}."
            )
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                return DownloadError(
                    f"{where}: access refused (HTTP {status}): the token is missing, invalid or "
                    f"lacks access; {LOGIN_HINT}."
                )
            return DownloadError(
                f"{where}: {self.endpoint} answered HTTP {status}. Try again later; if the files "
                "are already in the Hub cache, rerun with --offline."
            )
        # Connection refused, DNS, timeouts, proxies, truncated downloads: huggingface_hub raises
        # them as its HTTP library's own classes, which differ across its versions.
        cause = error.__cause__ or error
        return DownloadError(
            f"{where}: {self.repo_id} is neither a local file or folder nor reachable on the "
            f"Hub: could not reach {self.endpoint} "
            f"({type(cause).__name__}: {_first_line(cause)}). Check the network, --endpoint and "
            "HF_ENDPOINT; if the files are already in the Hub cache, rerun with --offline."
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
