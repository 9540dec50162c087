"""File-system safety (a foundation): folders and files that appear whole or not at all, an exclusive lock on an
output folder, and one-line errors for a full disk or an unwritable place.

- ``atomic_folder(dest)``: write everything into a hidden sibling ``.tmp-<name>-<pid>``, then rename it to
  ``dest``; killed half-way, ``dest`` is untouched (the old folder or nothing) and the temp folder is removed by
  ``clean_stale_tmp`` the next time. With ``replace=True`` an existing ``dest`` is replaced as a whole (no old
  file survives), by two renames: old folder aside, new folder in.
- ``atomic_write_text/bytes/json(path)``: the same for one file (``os.replace``, atomic on POSIX).
- ``FolderLock(folder)``: an exclusive ``.clmtune.lock`` file (``O_CREAT | O_EXCL``) holding the pid, host and
  command; a lock whose process is gone (same host) is stale and taken over with a warning.
- ``disk_full(exc, ...)``: ENOSPC -> "no space left ... writing FILE (about N MB needed, M MB free)".

Hand-written because neither the standard library nor the ML libraries offer these for folders: ``filelock``
(a transformers dependency) locks with ``flock``, which says nothing about *who* holds the lock, and
``save_pretrained`` writes file by file into the final folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".clmtune.lock"


def tmp_sibling(dest: Path, tag: str = "") -> Path:
    """``dir/.tmp-<name>[-tag]-<pid>``: hidden, beside ``dest`` (same file system, so the rename is atomic)."""
    return dest.parent / f"{TMP_PREFIX}{dest.name}{'-' + tag if tag else ''}-{os.getpid()}"


def _pid_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 only checks)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    return True


def clean_stale_tmp(folder: str | Path, name: str = "") -> list[Path]:
    """Remove ``.tmp-*`` entries in ``folder`` left by interrupted writes (their process is gone); returns them.
    ``name``: only the temporary siblings of that entry (``.tmp-<name>-<pid>``), in a folder clmtune does not own."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.glob(TMP_PREFIX + (f"{name}-*" if name else "*"))):
        pid = _pid_of(p.name)
        if pid is not None and (pid == os.getpid() or pid_alive(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning(f"removed {len(removed)} unfinished temporary item(s) left by an interrupted run in {folder}: "
                    + ", ".join(p.name for p in removed))
    return removed


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def disk_full(exc: OSError, path: str | Path, needed: int | None = None) -> ClmtuneError:
    """The one-line error for ENOSPC while writing ``path`` (``exc.filename`` is used when it is set)."""
    where = Path(exc.filename) if getattr(exc, "filename", None) else Path(path)
    probe = where if where.exists() and where.is_dir() else where.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    need = f"about {_mb(needed)} needed, " if needed else ""
    have = f"{_mb(free)} free" if free is not None else "free space unknown"
    return ClmtuneError(f"no space left on the device while writing {where} ({need}{have}); free some space or "
                        "choose an output folder on another disk (nothing half-written was kept)")


def _raise_os_error(exc: OSError, path: Path, needed: int | None) -> None:
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        raise disk_full(exc, path, needed) from None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise ClmtuneError(f"cannot write {exc.filename or path}: {exc.strerror}; choose a folder you can write "
                           "to") from None


@contextlib.contextmanager
def os_errors(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into a one-line ``ClmtuneError``."""
    try:
        yield
    except OSError as exc:
        _raise_os_error(exc, Path(path), needed)
        raise


@contextlib.contextmanager
def atomic_folder(dest: str | Path, replace: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes ``dest`` in one rename.

    On any error (or Ctrl-C) the temporary folder is removed and ``dest`` is left as it was. ``replace=False``
    refuses an existing non-empty ``dest``; ``replace=True`` swaps it out whole.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with os_errors(tmp, needed):
            yield tmp
            _commit(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, dest: Path, replace: bool) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if not replace:
        raise ClmtuneError(f"{dest} already exists and is not empty; choose another folder or allow replacing it")
    if not dest.is_dir():
        raise ClmtuneError(f"{dest} is a file, not a folder; choose another path")
    old = tmp_sibling(dest, "old")
    os.replace(dest, old)  # a crash between these two renames leaves dest absent and both temp folders
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, flush it to disk, then rename: readers see the old or the new file."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with os_errors(path, len(data)):
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Fail early, before minutes of loading, when ``folder`` cannot be created or written: a path that is a file
    or lies under a file, a read-only place, no permission."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == folder else f"lies under a file ({parent})"
                raise ClmtuneError(f"{what} {folder} {where}; choose a folder path")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{TMP_PREFIX}probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _raise_os_error(exc, folder, None)
        raise ClmtuneError(f"cannot write to {what} {folder} ({exc.strerror}); choose another folder") from None
    return folder


class FolderLock:
    """Exclusive use of an output folder by one clmtune process (``with FolderLock(out): ...``).

    The lock file is created with ``O_EXCL`` (atomic on local file systems) and holds the owner's pid, host,
    command and start time; it is removed on exit. A lock left by a process that no longer runs on this host is
    stale: it is taken over with a warning. A lock held by a live process (or one on another host, which cannot be
    checked) refuses the second writer with one line saying who holds it.
    """

    def __init__(self, folder: str | Path, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(["clmtune", *sys.argv[1:]])[:200]
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # unreadable: a process killed between create and write, or a stranger's file
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        return not pid_alive(int(holder.get("pid", -1)))

    def live_holder(self) -> dict[str, Any] | None:
        """Who holds this folder now (pid, host, command, started), or None when it is free or the lock is stale:
        lets a reader (``clmtune ui``'s run list) tell a running training from an interrupted one."""
        if not self.path.exists():
            return None
        holder = self._holder()
        return None if self._stale(holder) else (holder or {})

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    who = f"pid {holder.get('pid')}" if holder else "an unknown process"
                    log.warning(f"{self.folder}: removing the stale lock of {who}, which no longer runs")
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}` since "
                       f"{holder.get('started')}") if holder else "another process"
                raise ClmtuneError(f"{self.folder} is in use by another clmtune process ({who}); wait for it to "
                                   f"finish or use another output folder (if no such process runs, delete "
                                   f"{self.path})") from None
            except OSError as exc:
                _raise_os_error(exc, self.path, None)
                raise
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(info, fh)
            self.held = True
            return self
        raise ClmtuneError(f"could not take the lock {self.path} (it keeps reappearing); is another clmtune "
                           "process starting in this folder?")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
