"""Hidden scratch folders beside an output, the clean-up of those a killed run left behind, and the atomic rename
that never replaces (``renameat2(RENAME_NOREPLACE)``, or a link / mkdir claim without it), which claims
their names and publishes results.

Names are ``.{output name}.{pid}.{random}.lorasurgeon-{kind}``. The run that makes one holds an
advisory lock (``flock``) on it for as long as it exists; the kernel drops the lock when that
process ends, however it ends (a killed process that is still a zombie, whose pid still answers
``kill(pid, 0)``, holds no lock; nor does an unrelated process that got the same pid). So a folder
whose lock can be taken is debris, and the next run for the same output removes it; one whose lock
is held belongs to a run at work and is left alone. A folder is locked before it gets its final
name (it is made as ``...lorasurgeon-new`` and renamed), so no run ever sees one unlocked while its
owner lives. Folders of older versions, which hold no lock, are judged by their pid.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

KINDS = ("partial", "spool", "old")
_NAME = re.compile(r"^\.(?P<out>.+)\.(?P<pid>\d+)\.[^.]+\.lorasurgeon-(?P<kind>partial|spool|old|new)$")
_held: dict[Path, int] = {}  # scratch folder -> the descriptor holding its lock
before_writing: list[Callable[[], None]] = []  # called once before the first scratch of the process
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_looked_up: list[Callable[..., int] | None] = []  # libc's renameat2 once looked up (None: this libc has none)


def writing() -> None:
    """About to leave something on disk that a stop must clean up (a scratch folder, a hidden file): the hooks
    run once (the CLI arms its stop signals here; until then a stop has nothing to clean and ends the run at once)."""
    while before_writing:
        before_writing.pop(0)()


def make_scratch(out: Path, kind: str, keep: Callable[[Path], None] | None = None) -> Path:
    """A new hidden folder beside ``out`` (same file system, so a rename can publish it), locked by this process
    until :func:`release`. ``keep`` is handed the folder as soon as it has its name, so that an owner who must
    remove it (a writer's abort) knows it even if a stop signal cuts in before this returns; a stop before that
    removes it here."""
    assert kind in KINDS
    writing()
    made = final = _new_folder(out)
    fd = -1
    try:  # from here on, whatever stops it (a signal included) removes the folder
        final = made.with_name(made.name.removesuffix("new") + kind)
        fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(made, final)
        _held[final] = fd
        if keep is not None:
            keep(final)
    except BaseException:
        _held.pop(final, None)
        if fd >= 0:
            os.close(fd)
        for folder in (made, final):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return final


def _new_folder(out: Path) -> Path:
    """A new private ``....lorasurgeon-new`` folder beside ``out``, named before it is made (mkdtemp returns the
    name only after running more code), so that a stop signal arriving just after ``mkdir`` knows what to remove."""
    for _ in range(1000):
        made = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.lorasurgeon-new"
        try:
            os.mkdir(made, 0o700)
        except FileExistsError:
            continue
        except BaseException:
            shutil.rmtree(made, ignore_errors=True)  # a random name: if it is there, this call made it
            raise
        return made
    raise FileExistsError(f"{out.parent}: no free name for a scratch folder")


def release(folder: Path) -> None:
    """Drop this process's lock on a scratch folder (once it is removed, or published under another name)."""
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _pid_gone(pid: int) -> bool:
    """For folders without a lock: the process is gone, or only a zombie is left of it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _owner_gone(entry: Path, pid: int) -> int | None:
    """If ``entry``'s owner is gone: a descriptor holding its lock now (-1 when it could not be opened), else None."""
    if entry in _held:
        return None
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return -1 if _pid_gone(pid) else None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if entry.name.endswith("-new") and not _pid_gone(pid):  # being locked and renamed by a live run right now
        os.close(fd)
        return None
    return fd


def clean_stale(out: Path) -> list[Path]:
    """Remove the scratch folders of ``out`` left by runs that no longer exist; returns them.

    An earlier result that a killed run had moved aside (``old``) goes back to ``out`` if that is free.
    """
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = _NAME.match(entry.name)
        if not match or match.group("out") != out.name:
            continue
        fd = _owner_gone(entry, int(match.group("pid")))
        if fd is None:
            continue
        try:
            previous = entry / "result"
            if match.group("kind") == "old" and os.path.lexists(previous):
                try:
                    rename_noreplace(previous, out)
                except OSError:
                    continue  # out is taken: the earlier result stays here rather than be lost
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            if fd >= 0:
                os.close(fd)
    return removed


def _libc_renameat2() -> Callable[..., int] | None:
    if not _looked_up:
        import ctypes

        try:
            func = ctypes.CDLL(None, use_errno=True).renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _looked_up.append(func)
        except (AttributeError, OSError):
            _looked_up.append(None)
    return _looked_up[0]


def rename_noreplace(src: Path, dst: Path, *, kernel: bool = True) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst``, atomically.

    Raises FileExistsError when ``dst`` exists (nothing is changed then). ``kernel=False`` skips
    ``renameat2`` (the fallback, for file systems without it, and for its tests).
    """
    func = _libc_renameat2() if kernel else None
    if func is not None:
        if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        import ctypes

        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir() and not src.is_symlink():
        _claim_and_rename_dir(src, dst)
    else:
        _link_or_claim_file(src, dst)


def _link_or_claim_file(src: Path, dst: Path) -> None:
    """A file without renameat2: a hard link (fails with EEXIST, atomically); where the file system has no
    links, the name is claimed by an exclusive create and the claim replaced."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # FileExistsError if taken
        os.replace(src, dst)
        return
    os.unlink(src)


def _claim_and_rename_dir(src: Path, dst: Path) -> None:
    """A folder without renameat2: claim the name with mkdir (atomic), then rename onto the empty claim.

    If anything is put into the claimed folder in between, the rename fails (ENOTEMPTY) and that is kept.
    """
    os.mkdir(dst)  # FileExistsError if anything is there
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        try:
            os.rmdir(dst)
        except OSError:
            pass
        raise
