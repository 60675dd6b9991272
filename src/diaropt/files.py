"""Writing files so that a concurrent reader never sees a partial one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux ``/proc``);
    elsewhere set and restored at once (``os.umask`` has no getter)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed
    if it raises (a failed write, e.g. a full disk, leaves nothing at ``path``: neither a partial nor an
    empty file). The temporary name is hidden (leading dot) and keeps ``path``'s suffix, so writers
    that infer the format from it (``np.savez``, ``soundfile``) write the right one.

    The file gets the mode a plain ``open(path, "w")`` would give (0o666 minus the umask), not
    ``mkstemp``'s private 0o600: a shared cache stays readable to the group it was shared with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():  # a writer may have replaced the file: set the mode on what is renamed
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_of(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` blocks. Raises ``OSError`` if unreadable."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
