"""Files: result files checked before the work starts and replaced atomically at the end; the cache folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Folder for gpt2gen's caches: $GPT2GEN_CACHE, else $XDG_CACHE_HOME/gpt2gen, else ~/.cache/gpt2gen."""
    if env := os.environ.get("GPT2GEN_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2gen"


def check_writable(path: str | os.PathLike) -> Path:
    """Raise ValueError with a clear message if `path` cannot be written as a file; return the path to write.

    `~` is expanded. Only a regular file is ever replaced: a device, a FIFO, a socket or a folder
    at the path is refused. A symbolic link to a regular file (or to a file not yet there) stands
    for its target: the target is replaced and the link is kept.
    """
    if not str(path):
        raise ValueError("the path is empty; give a file path such as 'results.json'")
    given = Path(path).expanduser()
    target = given.resolve() if given.is_symlink() else given
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; give a file path such as {str(given / 'results.json')!r}")
    if target.exists() and not target.is_file():
        raise ValueError(f"{str(path)!r} exists and is not a regular file (a device, pipe or socket); "
                         "it is left alone: give the path of a regular file")
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: the directory {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"cannot write {str(path)!r}: permission denied")
    return target


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A reader sees either the old file or the complete new one, never a truncated file, even if the
    process is killed while writing. The path is checked again with `check_writable` (so a device
    or pipe that appeared since is refused with ValueError); a failed write raises OSError and
    leaves the old file as it was.
    """
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():
            os.chmod(tmp, target.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
