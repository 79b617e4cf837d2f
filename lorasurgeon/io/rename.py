"""An atomic rename that never replaces: ``renameat2(RENAME_NOREPLACE)``, or a link / mkdir claim without it."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_looked_up: list[Callable[..., int] | None] = []  # libc's renameat2 once looked up (None: this libc has none)


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
