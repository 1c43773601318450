"""Output files written without following symlinks: a planted link in an output folder
never makes fedsms write (or truncate) the link's target.

``write_text`` writes a temporary file beside the target and renames it over the target
(a rename replaces a link itself, never its target); ``append_line`` opens with
``O_NOFOLLOW`` and refuses a link.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedsms import FedSMSError


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a symlink at ``path`` is replaced, not followed).

    Parameters
    ----------
    path : str or Path
        The file to write; its folder must exist.
    text : str
        The file's whole new content.
    """
    write_bytes(path, text.encode())


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` to ``path`` (created if missing); a symlink at ``path`` is refused.

    Parameters
    ----------
    path : str or Path
        The file to append to.
    line : str
        The text to append, newline included.

    Raises
    ------
    FedSMSError
        ``path`` is a symbolic link.
    OSError
        The file cannot be opened for another reason.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if Path(path).is_symlink():
            raise FedSMSError(f"{path} is a symbolic link; fedsms does not write through links, remove it") from None
        raise
    with os.fdopen(fd, "a") as f:
        f.write(line)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (a symlink at ``path`` is replaced, not followed).

    Parameters
    ----------
    path : str or Path
        The file to write; its folder must exist.
    data : bytes
        The file's whole new content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
