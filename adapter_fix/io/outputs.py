"""Every file and folder a command writes: checked before any work, committed together.

The rules (README, "What is refused"), for any command that writes:

- An output folder (`-o OUT`) is created fresh, or replaces with `--force` only
  a folder that an earlier adapter-fix run wrote (it holds our marker file
  `.adapter-fix-output.json` and nothing the marker does not list) or an empty
  folder. Never the current folder, the home or root folder, or one that
  holds them; never a symbolic link; never an input, inside one, or around one.
- A report file is created fresh, or replaces an existing file only with
  `--force`; never an input, never an existing file in an input's folder,
  never a path inside OUT (except OUT's own files, which OUT's write makes).
- Every output is checked writable before any work starts.
- Everything is staged under a temporary name next to its target
  (`.NAME.partial-PID-XXXXXXXX`, created with the umask's mode like `mkdir`)
  and renamed into place only when all of it is written: reports first, then
  the folder, so an error leaves the old OUT and no report. Ctrl-C and SIGTERM
  unwind through the same cleanup; after SIGKILL, the next run for the same
  target removes what the dead process left (its PID no longer runs), and puts
  back an old OUT that a killed run had moved aside.

Use: build an `OutputSet`, call `check()` before the work, then write inside
`with outputs:` via `stage_folder()` and `write_report()`. Code deeper down
that writes a folder with `atomic_directory(out)` (the adapter writer) joins
the active `OutputSet` for the same path, so its folder is committed with the
reports; outside one, `atomic_directory` commits on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from adapter_fix import __version__
from adapter_fix.errors import OutputError

MARKER_NAME = ".adapter-fix-output.json"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_active: contextvars.ContextVar[OutputSet | None] = contextvars.ContextVar(
    "adapter_fix_outputs", default=None
)


def temporary_path(target: Path, kind: str) -> Path:
    """`.NAME.KIND-PID-RANDOM` next to `target`: unique, and traceable to this process."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale(target: Path) -> None:
    """Clean up after a killed run that wrote `target`: remove its staged copies; put back
    an old `target` it had moved aside when `target` itself is missing. Temporary names
    of processes that still run (a concurrent run) are left alone."""
    parent = target.parent
    if not parent.is_dir():
        return
    try:
        entries = [entry for entry in parent.iterdir() if entry.name.startswith(f".{target.name}.")]
    except OSError:
        return
    for entry in sorted(entries):
        match = _TEMPORARY.match(entry.name)
        if match is None or match["name"] != target.name or entry.is_symlink():
            continue
        if _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if match["kind"] == "old" and not os.path.lexists(target):
                entry.rename(target)
            elif entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _probe_writable(folder: Path, target: Path) -> None:
    """Create and remove a file in `folder` (the nearest existing ancestor of `target`)."""
    if not folder.is_dir():
        raise OutputError(
            f"{folder} is not a folder, so nothing can be written under it.", path=target
        )
    probe = temporary_path(folder / "probe", "partial")
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as error:
        raise OutputError(
            f"cannot write in {folder} ({error.strerror}); nothing was done.", path=target
        ) from None


def _protected(out: Path) -> str | None:
    """Why `out` (resolved) may never be replaced, or None."""
    if out.parent == out:
        return "it is the root folder"
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == cwd:
        return "it is the current folder"
    if out == home:
        return "it is your home folder"
    if cwd.is_relative_to(out):
        return "it holds the current folder"
    if home.is_relative_to(out):
        return "it holds your home folder"
    return None


def _marker_files(out: Path) -> set[str] | None:
    """The file names an earlier adapter-fix run wrote into `out`, or None if it did not."""
    try:
        marker = json.loads((out / MARKER_NAME).read_text())
        files = marker["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if marker.get("tool") != "adapter-fix" or not isinstance(files, list):
        return None
    return {name for name in files if isinstance(name, str)}


def check_folder_target(out: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output folder that may not be written or replaced (see the module doc)."""
    if out.is_symlink():
        raise OutputError(
            "the output is a symbolic link; adapter-fix never writes through one, because "
            "replacing it would replace a folder elsewhere. Give the real path.",
            path=out,
        )
    resolved = out.resolve()
    reason = _protected(resolved)
    if reason is not None:
        raise OutputError(
            f"the output cannot be this folder: {reason}. Name a new folder, e.g. -o ./fixed.",
            path=resolved,
        )
    check_not_an_input(resolved, inputs)
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise OutputError("the output exists and is not a folder; choose another -o.", path=out)
    if not force:
        raise OutputError(
            "the output already exists; pass --force to replace it (only an earlier "
            "adapter-fix output or an empty folder can be replaced).",
            path=out,
        )
    present = {entry.name for entry in resolved.iterdir()}
    if not present:
        return
    written = _marker_files(resolved)
    if written is None:
        raise OutputError(
            f"--force replaces only a folder an earlier adapter-fix run wrote (it holds "
            f"{MARKER_NAME}) or an empty folder, and this one is neither; its files are left "
            "alone. Choose another -o, or remove the folder yourself.",
            path=out,
        )
    foreign = sorted(present - written - {MARKER_NAME})
    if foreign:
        raise OutputError(
            f"this earlier adapter-fix output now also holds files adapter-fix did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); --force will not "
            "delete them. Move them out, or choose another -o.",
            path=out,
        )


def check_not_an_input(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is, holds, or lies inside an input."""
    out = out.resolve()
    for path in inputs:
        path = path.resolve()
        if out.is_relative_to(path) or path.is_relative_to(out):
            raise OutputError(
                f"this output would overlap the input {path}; adapter-fix never writes inside "
                "or over an input. Choose another path.",
                path=out,
            )


def check_report_target(path: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse a report file that may not be written or replaced (see the module doc)."""
    resolved = path.resolve()
    check_not_an_input(resolved, inputs)
    if not os.path.lexists(path):
        return
    if resolved.is_dir():
        raise OutputError("the report path is a folder; give a file name.", path=path)
    for source in inputs:
        source = source.resolve()
        if source.is_file() and resolved.parent == source.parent:
            raise OutputError(
                f"the report would replace a file in the folder of the input {source}; "
                "adapter-fix never replaces files next to its inputs. Choose another path.",
                path=path,
            )
    if not force:
        raise OutputError(
            "the report file already exists; pass --force to replace it, or choose another path.",
            path=path,
        )


class OutputSet:
    """One command's outputs: an optional folder and report files (see the module doc).

    `folder_files` names files the folder's own write makes (`repair_report.json`):
    a report path naming one of them inside OUT is written with OUT, not twice.
    """

    def __init__(
        self,
        *,
        folder: Path | None = None,
        reports: Sequence[Path] = (),
        inputs: Sequence[Path] = (),
        force: bool = False,
        folder_files: Sequence[str] = (),
    ) -> None:
        self.folder = None if folder is None else Path(os.path.abspath(folder))
        self.inputs = list(inputs)
        self.force = force
        self.reports = self._own_reports([Path(os.path.abspath(p)) for p in reports], folder_files)
        self._staging: Path | None = None
        self._staged_reports: dict[Path, Path] = {}
        self._created: list[Path] = []
        self._token: contextvars.Token[OutputSet | None] | None = None

    def _own_reports(self, reports: list[Path], folder_files: Sequence[str]) -> list[Path]:
        own: list[Path] = []
        folder = None if self.folder is None else self.folder.resolve()
        for path in reports:
            resolved = path.resolve()
            if folder is not None and resolved.is_relative_to(folder):
                if resolved.parent == folder and resolved.name in folder_files:
                    continue  # written as part of OUT
                raise OutputError(
                    f"a report inside the output folder {self.folder} would overwrite or add "
                    f"to the adapter written there; only {', '.join(folder_files) or 'nothing'} "
                    "may be named there. Write reports outside OUT.",
                    path=path,
                )
            if any(resolved == other.resolve() for other in own):
                raise OutputError("this report path is given twice.", path=path)
            own.append(path)
        return own

    def check(self) -> None:
        """Before any work: every rule above, stale temporaries removed, every target writable."""
        targets = [*([self.folder] if self.folder is not None else []), *self.reports]
        for target in targets:
            if not target.is_symlink():
                remove_stale(target)
        if self.folder is not None:
            check_folder_target(self.folder, self.inputs, force=self.force)
        for path in self.reports:
            check_report_target(path, self.inputs, force=self.force)
        for target in targets:
            _probe_writable(_nearest_existing(target.parent), target)

    def __enter__(self) -> OutputSet:
        self._token = _active.set(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _active.reset(self._token)
            self._token = None
        if kind is not None:
            self._discard()
            return
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise

    def stage_folder(self) -> Path:
        """The temporary folder that becomes `folder` on commit (created on first use)."""
        if self.folder is None:
            raise OutputError("this command has no output folder.")
        if self._staging is None:
            self._make_parents(self.folder)
            staging = temporary_path(self.folder, "partial")
            try:
                staging.mkdir(0o777)  # the umask applies, as for any mkdir
            except OSError as error:
                raise OutputError(
                    f"cannot create the output folder ({error.strerror}).", path=self.folder
                ) from None
            self._staging = staging
        return self._staging

    def write_report(self, path: Path, text: str) -> None:
        """Stage one report; it replaces `path` when the set commits."""
        target = Path(os.path.abspath(path))
        if target not in self.reports:
            raise OutputError("this report path was not checked before the run.", path=path)
        try:
            self._make_parents(target)
            staged = temporary_path(target, "partial")
            self._staged_reports[target] = staged
            with staged.open("x", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise OutputError(f"cannot write the report ({error.strerror}).", path=path) from None

    def _make_parents(self, target: Path) -> None:
        missing = []
        parent = target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as error:
                raise OutputError(
                    f"cannot create the folder {folder} ({error.strerror}).", path=target
                ) from None
            self._created.append(folder)

    def _commit(self) -> None:
        """Reports first, then the folder; any failure puts back what was there."""
        if self.folder is not None:
            check_folder_target(self.folder, self.inputs, force=self.force)
        for path in self._staged_reports:
            check_report_target(path, self.inputs, force=self.force)
        replaced: list[tuple[Path, Path | None]] = []
        try:
            for target, staged in self._staged_reports.items():
                backup = temporary_path(target, "old") if os.path.lexists(target) else None
                if backup is not None:
                    target.rename(backup)
                replaced.append((target, backup))
                staged.rename(target)
            if self._staging is not None and self.folder is not None:
                _write_marker(self._staging)
                _replace_folder(self._staging, self.folder)
                self._staging = None
        except BaseException as error:
            for target, backup in reversed(replaced):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        backup.replace(target)
                    else:
                        target.unlink()
            if isinstance(error, OSError):
                raise OutputError(
                    f"writing the output failed ({error.strerror}).", path=self.folder
                ) from None
            raise
        for _, backup in replaced:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        self._staged_reports.clear()
        self._created.clear()

    def _discard(self) -> None:
        """Remove everything staged and every folder created for it."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        for staged in self._staged_reports.values():
            with contextlib.suppress(OSError):
                staged.unlink()
        self._staged_reports.clear()
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created.clear()


def _write_marker(staging: Path) -> None:
    """Record what adapter-fix wrote, so a later --force knows the folder is its own."""
    files = sorted(entry.name for entry in staging.iterdir())
    marker = {"tool": "adapter-fix", "version": __version__, "files": files}
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _replace_folder(staging: Path, out: Path) -> None:
    if not os.path.lexists(out):
        staging.rename(out)
        return
    retired = temporary_path(out, "old")
    out.rename(retired)
    try:
        staging.rename(out)
    except BaseException:
        retired.rename(out)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` when all is written.

    Inside an active `OutputSet` whose folder is `out`, the folder is that
    set's staging folder and is committed with its reports; otherwise `out`
    is checked, staged and committed here. On any error, Ctrl-C or SIGTERM the
    temporary folder is removed and `out` is untouched.
    """
    active = _active.get()
    try:
        if active is not None and active.folder == Path(os.path.abspath(out)):
            yield active.stage_folder()
            return
        with OutputSet(folder=out, force=force) as outputs:
            outputs.check()
            yield outputs.stage_folder()
    except OSError as error:
        raise OutputError(f"writing the output failed ({error.strerror}).", path=out) from None
