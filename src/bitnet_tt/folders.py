"""Publishing a folder atomically: build it under a hidden partial name beside its destination, then move it
into place in one step.

A partial folder's name carries its owner process (boot id, pid and the pid's start time), so that a later
run tells a partial folder left by a killed process from one still being written, and removes it.

On Linux the final step is renameat2: RENAME_NOREPLACE fails if the destination exists (two writers cannot
both win), and RENAME_EXCHANGE swaps an old folder with the new one (there is never an instant with nothing
at the destination). Where the call is missing (other systems, filesystems without the flags), a lock on
the parent folder serialises the check and the renames instead, and replacing takes two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
# errnos meaning "this system or filesystem has no such rename": fall back to the lock
NO_RENAMEAT2 = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
OWNER_TAG = re.compile(r"^(?P<boot>[0-9a-f]+)-(?P<pid>\d+)-(?P<start>\d+)(-old)?$")


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


# ---------------------------------------------------------------------------------------------
# Partial folders and their owners


def partial_folder(dst: Path) -> Path:
    """A new, empty hidden folder beside `dst` (parents created), named after this process."""
    partial = dst.parent / f".{dst.name}.partial-{process_tag(os.getpid())}"
    partial.mkdir(parents=True)
    return partial


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove the partial folders of `dst` whose owner process has ended (killed, or before a reboot)."""
    prefix = f".{dst.name}.partial-"
    try:
        entries = list(dst.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing of ours can be there
        return []
    stale = [e for e in entries if e.name.startswith(prefix) and e.is_dir() and not e.is_symlink()
             and (tag := OWNER_TAG.match(e.name[len(prefix):])) and not owner_alive(tag)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def process_tag(pid: int) -> str:
    """'BOOT-PID-START': names a process uniquely across pid reuse and reboots ('0' parts where /proc is missing)."""
    return f"{_boot_id()}-{pid}-{_start_time(pid)}"


def owner_alive(tag: re.Match) -> bool:
    if tag["boot"] != _boot_id():
        return False  # written before a reboot
    pid = int(tag["pid"])
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # alive, and another user's
    return _start_time(pid) in ("0", tag["start"])  # a reused pid started later; "0": cannot tell, so alive


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
    except OSError:
        return "0"


def _start_time(pid: int) -> str:
    """When `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat); '0' when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


# ---------------------------------------------------------------------------------------------
# The final step


def publish(partial: Path, dst: Path, replaceable: Callable[[Path], bool] | None = None) -> None:
    """Move the finished `partial` folder to `dst` in one step; FileExistsError if `dst` exists.

    With `replaceable`, an existing `dst` for which it holds is swapped with `partial` instead: `partial`
    then holds the old folder, for the caller to remove.
    """
    sync_folder(partial)
    with _signals_held():
        try:
            _publish_with_renameat2(partial, dst, replaceable)
        except OSError as exc:
            if exc.errno not in NO_RENAMEAT2:
                raise
            _publish_under_lock(partial, dst, replaceable)
    sync_folder(dst.parent, files=False)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the renames are done: none lands between a swap and its undo."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _publish_with_renameat2(partial: Path, dst: Path, replaceable) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    try:
        _rename(partial, dst, RENAME_NOREPLACE)
        return
    except FileExistsError:
        if replaceable is None:
            raise
    _rename(partial, dst, RENAME_EXCHANGE)
    if not replaceable(partial):  # what was at dst, checked after the swap so that it cannot change meanwhile
        _rename(partial, dst, RENAME_EXCHANGE)
        raise FileExistsError(errno.EEXIST, "exists and may not be replaced", str(dst))


def _rename(src: Path, dst: Path, flags: int) -> None:
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))  # EEXIST gives FileExistsError


def _publish_under_lock(partial: Path, dst: Path, replaceable) -> None:
    with _locked(dst.parent):
        if not os.path.lexists(dst):
            partial.rename(dst)
            return
        if replaceable is None or not replaceable(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        aside = partial.with_name(partial.name + "-old")
        dst.rename(aside)  # from here to the next rename there is nothing at dst
        partial.rename(dst)
        aside.rename(partial)


@contextlib.contextmanager
def _locked(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flush `folder`'s files and its entries to the disk, so that a power cut after publishing loses nothing."""
    paths = [p for p in folder.iterdir() if p.is_file()] if files else []
    for path in [*paths, folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
