"""How every stage writes its output: one protocol for output folders and files.

A stage never writes into its output path. It works in `OUT.partial` beside it while holding an
exclusive lock, and renames the work folder to `OUT` only when it is complete. So:

- the output path holds a complete output or nothing new, whatever happens (crash, full disk, Ctrl-C);
- an existing output is replaced only with `--overwrite`, and only when lrsurgery wrote it (an
  artifact, fused model, PEFT export, data package, results file or figure), never a user's folder;
- an output equal to an input, inside an input folder or holding one is refused;
- a second process writing the same output is refused while the first runs. The lock is an `flock` on
  `.OUT.lock`, which the kernel drops when its process dies, so a crash leaves no lock that blocks;
- a resumable stage (train, calibrate) keeps `OUT.partial` after a failure once it holds progress
  (`Work.keep`), and pins its settings there (`Work.pin`) so `--resume` continues only the same run.
  A work folder without progress is removed on failure, so it never blocks the next run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrsurgery.errors import ArtifactError

WORK_MARKER = ".lrsurgery-work"  # inside OUT.partial while a stage works in it


PIN_FILE = "run.json"


# the provenance file that marks each kind of output folder (a JSON object with `lrsurgery_version`);
# an artifact's manifest says its kind itself (init, train, stats)
FOLDER_MARKERS = {
    "manifest.json": None,
    "lrsurgery_fuse.json": "merged model",
    "lrsurgery_export.json": "PEFT adapter",
    "lrsurgery_data.json": "data",
}


class OutputError(ArtifactError):
    """The output path cannot be written: it exists, is an input, is not lrsurgery's, or is in use."""


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def folder_kind(path: Path) -> str | None:
    """Which lrsurgery output the folder `path` is (init, train, stats, merged model, PEFT adapter, data),
    or None when lrsurgery did not write it."""
    if not path.is_dir():
        return None
    for name, kind in FOLDER_MARKERS.items():
        record = _json_object(path / name) or {}
        if "lrsurgery_version" in record:
            return kind or str(record.get("kind"))
    return None


def work_folder(out: Path) -> Path:
    """The work folder of output `out`: `OUT.partial` beside it."""
    return out.with_name(out.name + ".partial")


def _same_or_nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


MAX_NAME_BYTES = 255 - 16  # room beside it for `.NAME.lock`, `NAME.partial`, `.NAME.tmp-PID`, `.NAME.old-PID`


def _absolute(out: str | os.PathLike) -> Path:
    """`out` as an absolute path without `.` or `..` (so `-o .` names the current folder), its name short
    enough for the files the protocol puts beside it."""
    if not str(out):
        raise OutputError("the output path is empty; give a path to a new folder or file")
    target = Path(os.path.abspath(out))
    if not target.name:
        raise OutputError(f"{out} cannot be an output; give a path to a new folder or file")
    if len(target.name.encode()) > MAX_NAME_BYTES:
        raise OutputError(f"the output name {target.name[:40]}... is too long: at most {MAX_NAME_BYTES} bytes")
    return target


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    kind: str = "",
    kind_of: Callable[[Path], str | None] = folder_kind,
    what: str = "folder",
) -> None:
    """Refuse an output that would destroy data: an input (or, for a folder, one inside or around an
    input), a path under a file, a symbolic link, an existing path without `overwrite`, and with it an
    existing path that is not an lrsurgery output of the same `kind` (as `kind_of` tells)."""
    path = _absolute(out)
    if path.is_symlink():  # replacing it would replace the link, not what it names: too easy to misread
        raise OutputError(f"{out} is a symbolic link; give the path it stands for, or another output path")
    target = path.resolve()
    for given in inputs:
        if not given or not Path(given).exists():
            continue  # hub ids and named models are not paths
        source = Path(given).resolve()
        clash = target == source if what == "file" else _same_or_nested(target, source)
        if clash:
            raise OutputError(f"output {out} is the input {given} or overlaps it; choose another output path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
            break
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise OutputError(f"{out} already exists; choose another output or pass --overwrite")
    if what == "folder" and not target.is_dir():
        raise OutputError(f"{out} exists and is a file, not an output folder; choose another output path")
    found = kind_of(target)
    if found is None:
        raise OutputError(
            f"{out} exists and is not an lrsurgery {kind or what}; --overwrite replaces only lrsurgery's own, "
            "so remove it yourself or choose another output path"
        )
    if kind and found != kind:
        raise OutputError(
            f"{out} is an lrsurgery {found}, not {kind}: --overwrite replaces only an output of the same kind, "
            "so choose another output path"
        )


class Lock:
    """An exclusive `flock` on `path`, refused (or waited for, with `wait`) while another process holds it.

    The file is removed on release; a holder that died leaves at most an unlocked file behind, which the
    next `acquire` takes over. After locking, the file is checked to still be the one at `path` (another
    holder may have removed it in between), otherwise the lock is taken again.
    """

    def __init__(self, path: Path, what: str, wait: bool = False):
        self.path, self.what, self.wait, self.fd = path, what, wait, -1

    def acquire(self) -> Lock:
        import fcntl

        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # never through a link: a lock file that is one would have its target overwritten
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                odd = self.path.is_symlink() or self.path.is_dir()
                why = f"its lock file {self.path} is not a plain file; remove it" if odd else exc.strerror or exc
                raise OutputError(f"cannot write {self.what}: {why}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(
                    f"{self.what} is being written by another lrsurgery process (pid {holder}); "
                    "wait for it to finish or choose another output path"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: see the class doc
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_for(out: str | os.PathLike, wait: bool = False) -> Lock:
    """The lock that guards output `out`: `.OUT.lock` beside it."""
    target = _absolute(out)
    return Lock(target.with_name(f".{target.name}.lock"), str(out), wait)


def swap_into(new: Path, dest: Path) -> None:
    """Put the complete folder `new` at `dest`, replacing what is there.

    Where the kernel can (Linux's renameat2 with RENAME_EXCHANGE), the two folders trade places in one
    atomic step, so `dest` is at every moment either the old folder or the new one, even across a crash;
    elsewhere two renames, with a moment in which `dest` is absent."""
    if dest.exists():
        if _exchange(new, dest):
            shutil.rmtree(new, ignore_errors=True)  # the old folder, now at `new`'s path
            return
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(dest)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    done = renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange)
    if done == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # a file system or kernel without it
    raise OSError(error, os.strerror(error), str(b))


@dataclass
class Work:
    """A stage's work folder (`folder`) for output `out`."""

    folder: Path
    out: Path
    resumed: bool = False  # an interrupted run's folder was taken up
    kept: bool = False

    def keep(self) -> None:
        """The folder now holds progress: keep it if the stage fails from here on (for `--resume`)."""
        self.kept = True

    def pin(self, settings: dict[str, Any]) -> None:
        """Record the run's settings; refuse to continue a run that was started with different ones."""
        current = _flatten(json.loads(json.dumps(settings, default=str)))
        path = self.folder / PIN_FILE
        if not path.exists():
            write_text_atomic(path, json.dumps(current, indent=2))
            return
        before = _json_object(path)
        if before is None:
            raise OutputError(f"{path} is damaged, so {self.folder} cannot be resumed; start over with --overwrite")
        changed = sorted(k for k in before.keys() | current.keys() if before.get(k) != current.get(k))
        if changed:
            raise OutputError(
                f"cannot resume {self.folder}: it was started with different settings ({', '.join(changed)}); "
                "use the same options, or --overwrite to start over"
            )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def output_folder(
    out: str | os.PathLike,
    kind: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    resume: bool | None = None,
    active: bool = True,
) -> Iterator[Work]:
    """Write the output folder `out`, an lrsurgery output of `kind`, by the protocol of the module doc;
    yields the `Work` to write into.

    `resume` is None for a stage that cannot resume; for one that can, an interrupted run's work folder
    is taken up with `resume=True`, refused without it, and discarded with `overwrite`. On success the
    work folder becomes `out`. `active=False` (a non-main process of a distributed run) only names the
    work folder: the main process checks, locks, creates and finishes it.
    """
    target = _absolute(out)
    work = Work(work_folder(target), target)
    if not active:
        yield work
        return
    check_output(out, inputs, overwrite, kind)
    with lock_for(out):
        check_output(out, inputs, overwrite, kind)  # again: another process may have finished it meanwhile
        if work.folder.exists() or work.folder.is_symlink():
            if work.folder.is_symlink() or not (work.folder / WORK_MARKER).is_file():
                raise OutputError(f"{work.folder} is in the way and is not an lrsurgery work folder; move it away")
            if resume:
                work.resumed = work.kept = True
            elif resume is not None and not overwrite:
                raise OutputError(
                    f"{work.folder} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
                )
            else:  # a finished-off run's leftovers (or --overwrite): nothing of it is wanted
                shutil.rmtree(work.folder)
        if not work.resumed:
            work.folder.mkdir(parents=True)
            (work.folder / WORK_MARKER).touch()
        try:
            yield work
        except BaseException:
            if not work.kept:
                shutil.rmtree(work.folder, ignore_errors=True)
            raise
        (work.folder / PIN_FILE).unlink(missing_ok=True)
        swap_into(work.folder, target)
        (target / WORK_MARKER).unlink(missing_ok=True)  # after the rename: till then it marks the work folder


@contextlib.contextmanager
def output_file(
    out: str | os.PathLike,
    kind: str,
    kind_of: Callable[[Path], str | None],
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Write the output file `out`, an lrsurgery output of `kind` (as `kind_of` tells of an existing
    file): checked as `check_output`, locked, written to a temporary file beside it (the yielded path)
    and renamed into place only when the block completes."""
    target = _absolute(out)
    check_output(out, inputs, overwrite, kind, kind_of, what="file")
    if target.is_dir():
        raise OutputError(f"{out} is a folder; give a file path")
    with lock_for(out), atomic_file(target) as tmp:
        check_output(out, inputs, overwrite, kind, kind_of, what="file")
        yield tmp


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def is_main_process() -> bool:
    """Whether this is the process that writes and reports: rank 0 of several (torchrun and `accelerate
    launch` set RANK), or the only one. Known before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0
