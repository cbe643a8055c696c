"""Versioned index folders: builds publish a new version by flipping a pointer; readers never repair.

    <home>/<name>/CURRENT     the name of the complete version readers open ("v-...")
    <home>/<name>/v-*/        one complete build each (meta.sqlite, dense.faiss, tokens.npy, suffix.npy)
    <home>/<name>/.tmp-*/     a build in progress (its builder holds an exclusive flock on it)
    <home>/<name>/.lock       writers' lock: publishing and garbage collection hold it

A build writes everything into `.tmp-*`, renames it to `v-*` and replaces CURRENT atomically
(a temporary file + os.replace): a reader sees the old version or the new one, whole. A reader
holds a shared flock on the version directory it opened for as long as the Index lives; old
versions, and `.tmp-*` folders whose builder died, are deleted by the next writer only when it
gets an exclusive flock on them. An index folder without CURRENT but with meta.sqlite (written
by ragspec before versioned folders) is read as one version, and replaced by the first build.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
import weakref
from pathlib import Path

from ragspec.errors import IndexCorrupt
from ragspec.index import store

try:
    import fcntl
except ImportError:  # not POSIX: no leases (an old version may be deleted while it is read)
    fcntl = None  # type: ignore[assignment]

POINTER = "CURRENT"
LOCK = ".lock"
_VERSION = re.compile(r"v-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}")
# Files of a pre-versioned index; removed once a versioned build has replaced it.
LEGACY_FILES = (store.META_FILE, store.DENSE_FILE, store.TOKENS_FILE, store.SUFFIX_FILE,
                f"{store.META_FILE}-journal", f"{store.META_FILE}-wal", f"{store.META_FILE}-shm")
_OPEN_ATTEMPTS = 200


class Lease:
    """An flock held on a directory (shared: reading it; exclusive: building or deleting it)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def take(cls, path: Path, exclusive: bool = False, wait: bool = True) -> Lease | None:
        """The lease, or None when `path` is gone (or, with wait=False, when someone else holds it)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if fcntl is not None:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return None
        return cls(path, fd)

    def release(self) -> None:
        self._finalizer()


@contextlib.contextmanager
def writer_lock(folder: Path):
    """Held while publishing a version or deleting old ones (one writer at a time)."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def current(folder: Path) -> Path | None:
    """The directory holding the files readers should open now, or None when there is none."""
    try:
        name = (folder / POINTER).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return folder if (folder / store.META_FILE).is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexCorrupt(f"cannot read {folder / POINTER} ({exc}); {store.REBUILD_HINT}") from exc
    if not _VERSION.fullmatch(name):
        raise IndexCorrupt(f"{folder / POINTER} names {name[:40]!r}, not a version; {store.REBUILD_HINT}")
    return folder / name


def lease_current(folder: Path) -> tuple[Path, Lease] | None:
    """(version directory, shared lease on it) for the version CURRENT names once leased; None if none.

    A version is only deleted under an exclusive lease, so once the pointer still names the
    directory after the shared lease is taken, it stays whole for as long as the lease is held.
    """
    for _ in range(_OPEN_ATTEMPTS):
        target = current(folder)
        if target is None:
            return None
        lease = Lease.take(target)
        if lease is not None and current(folder) == target and (target / store.META_FILE).is_file():
            return target, lease
        if lease is not None:
            lease.release()
        time.sleep(0.001)  # a writer flipped the pointer in between: look again
    raise IndexCorrupt(f"{folder} changed {_OPEN_ATTEMPTS} times while being opened; try again")


def start_build(folder: Path) -> tuple[Path, Lease]:
    """A fresh `.tmp-*` directory in the index folder, exclusively leased by this builder."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = folder / f".tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        lease = Lease.take(tmp, exclusive=True)
        if lease is not None and tmp.is_dir():  # not collected as a dead build in between
            return tmp, lease
        if lease is not None:
            lease.release()


def publish(folder: Path, tmp: Path, lease: Lease, keep: tuple[str, ...] = ()) -> Path:
    """Make the finished `tmp` the version readers open; delete what no reader holds any more.

    Folder-level files other than those in `keep` (learned state such as past_responses.npy)
    are removed: a new build starts without them.
    """
    with writer_lock(folder):
        version = folder / f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
        os.replace(tmp, version)
        lease.release()  # only writers delete versions, and they wait for the lock held here
        pointer = folder / f".{POINTER}-{secrets.token_hex(4)}"
        pointer.write_text(version.name + "\n", encoding="ascii")
        os.replace(pointer, folder / POINTER)
        if store.PAST_RESPONSES_FILE not in keep:
            with contextlib.suppress(FileNotFoundError):
                (folder / store.PAST_RESPONSES_FILE).unlink()
        _collect(folder, version.name)
    return version


def _collect(folder: Path, keep: str) -> None:
    """Delete old versions, dead builds and stale pointer files that no one holds (writer lock held)."""
    for child in folder.iterdir():
        name = child.name
        if name == keep:
            continue
        if name.startswith(f".{POINTER}-"):
            child.unlink(missing_ok=True)  # written only under the writer lock: a dead writer's
        elif child.is_dir() and (name.startswith((".tmp-", ".trash-")) or _VERSION.fullmatch(name)):
            _delete_if_unused(child)
    if (folder / store.META_FILE).exists():
        _delete_legacy_files(folder)


def _delete_if_unused(directory: Path) -> None:
    lease = Lease.take(directory, exclusive=True, wait=False)
    if lease is None:
        return  # a reader (or a live build) holds it: a later writer collects it
    trash = directory if directory.name.startswith(".trash-") else directory.with_name(f".trash-{directory.name}")
    os.replace(directory, trash)  # no reader can open it by name from now on
    shutil.rmtree(trash, ignore_errors=True)
    lease.release()


def _delete_legacy_files(folder: Path) -> None:
    lease = Lease.take(folder, exclusive=True, wait=False)
    if lease is None:
        return  # a reader still holds the pre-versioned index
    for name in LEGACY_FILES:
        (folder / name).unlink(missing_ok=True)
    lease.release()


def is_index_folder(folder: Path) -> bool:
    return (folder / POINTER).is_file() or (folder / store.META_FILE).is_file()
