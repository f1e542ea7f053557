"""Atomic files: every file the project writes goes through ``write_bytes_atomic`` (a temporary
file beside the target, renamed into place), so a reader or a crash never sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: os.PathLike | str, obj) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: a reader (or a
    crash) never sees half a file. Every file the project writes goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_section(path: os.PathLike | str, section: str, start: str, end: str) -> None:
    """``path``'s text with the part from the marker ``start`` to ``end`` replaced by ``section`` (which carries
    both markers), or ``section`` appended where the markers are not there yet (atomic): a generated section of a
    hand-edited file, such as a model card's INT8 or TTA section, rewritten on each run."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text_atomic(path, text)
