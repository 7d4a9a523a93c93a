"""Files that appear complete under their final name or not at all, and the names of per-rank checkpoint files.

Used by the ``lorapro`` command, the integrations and ``experiments/``; imports none of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it into place.

    The file gets the permissions a plain ``open(path, "wb")`` would give it (``0o666`` less the umask);
    the parent directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON indented by 2, with a final newline."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` into place as ``out``; an earlier ``out`` is removed only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def rank_file_name(prefix: str, rank: int, world: int) -> str:
    """``{prefix}.rank{R}-of-{W}.pt``: rank ``R``'s own part of a checkpoint written by ``W`` processes."""
    return f"{prefix}.rank{rank}-of-{world}.pt"


def rank_file_pattern(prefix: str) -> re.Pattern[str]:
    """Matches the names :func:`rank_file_name` gives for ``prefix``; groups 1 and 2 are the rank and the world."""
    return re.compile(rf"^{re.escape(prefix)}\.rank(\d+)-of-(\d+)\.pt$")
