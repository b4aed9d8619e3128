"""Small shared helpers: the cache directory, atomic writes and their leftovers."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from mdlm_kit.errors import UserError


def cache_dir() -> Path:
    """``$MDLM_KIT_CACHE``, else ``$XDG_CACHE_HOME/mdlm-kit``, else ``~/.cache/mdlm-kit``."""
    if os.environ.get("MDLM_KIT_CACHE"):
        return Path(os.environ["MDLM_KIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mdlm-kit"


def host_tag() -> str:
    """This machine's name without dashes, for names of temporary files that encode ``host-pid``."""
    return socket.gethostname().replace("-", "_") or "host"


def process_gone(pid: int) -> bool:
    """True if no process ``pid`` runs on this machine (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None], durable: bool = False) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``: readers see the old
    file or the complete new one, even if the process is killed part-way (``remove_stale_temps`` clears what that
    leaves). ``durable`` also syncs the file and its folder to disk, so the new file survives a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{host_tag()}-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the permissions a plain open() would
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def remove_stale_temps(path: str | Path) -> None:
    """Remove the temporary files of ``atomic_write(path)`` calls whose process died on this machine (those of live
    processes, and of other machines sharing the folder, stay)."""
    path = Path(path)
    prefix = f".{path.name}.{host_tag()}-"
    for tmp in path.parent.glob(f"{prefix}*-*.tmp"):
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if pid.isdecimal() and process_gone(int(pid)):
            tmp.unlink(missing_ok=True)


def check_writable_folder(folder: str | Path, what: str, create: bool = False) -> None:
    """Fail early, with one line, if files cannot be written in ``folder`` (with ``create``, in its nearest existing
    parent; nothing is created): before hours of work, not after. Tries a real file, so it also catches read-only
    mounts and root's permission-bit bypass that ``os.access`` does not."""
    folder = Path(folder).expanduser()
    probe = folder
    if create:
        while not probe.exists() and probe != probe.parent:
            if probe.is_symlink():
                raise UserError(f"{what}: {probe} is a symbolic link to nothing; fix the link or pick another path")
            probe = probe.parent
    if not probe.is_dir():
        if probe.exists():
            raise UserError(f"{what}: {probe} is a file, not a folder; pick another path")
        raise UserError(f"{what}: the folder {folder} does not exist; create it or pick another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in the folder {probe} ({e.strerror}); pick a writable folder") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
