"""Crash-safe file writes: write a temporary file beside the target, fsync, then rename over it.

Also: checksummed torch files (a damaged checkpoint is detected, never loaded silently) and a check
that a folder can be written before a run spends time loading data.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import torch

DIGEST_KEY = "sha256"  # save_checked: the content digest of the other entries
MIN_FREE_BYTES = 1 << 20  # a folder on a disk with less than this free is refused up front
_PROBE_BYTES = 64 << 10


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(binary_file)`` on a temp file and atomically replace ``path`` with it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            raise e.__context__ from None  # torch.save on a full disk: its writer fails again while closing
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def save_jsonl(records, path: str | Path) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()))


def content_digest(obj) -> str:
    """SHA-256 of a (nested) dict/list/tuple/scalar/tensor structure as ``torch.load`` returns it: the same
    value after a save/load round trip, a different one if any key, value or tensor byte differs."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save_checked(record: dict, path: str | Path) -> None:
    """``torch.save`` the dict ``record`` atomically, plus a ``DIGEST_KEY`` entry: the ``content_digest`` of
    the rest (``torch.load`` itself does not verify what it reads: a flipped tensor byte loads silently).
    The file stays an ordinary torch file with the same keys."""
    save_torch({**record, DIGEST_KEY: content_digest(record)}, path)


def load_checked(path: str | Path) -> tuple[object, bool]:
    """(object, verified) from a ``save_checked`` file, or from a file without a digest (verified False).
    ValueError with a one-line reason if the file cannot be read or its content fails the digest."""
    try:
        with warnings.catch_warnings():  # a damaged header can make torch warn (several lines) before failing
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")  # written on any device
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise ValueError(_first_line(e)) from None
    if not (isinstance(obj, dict) and DIGEST_KEY in obj):
        return obj, False
    digest = obj.pop(DIGEST_KEY)
    try:
        same = digest == content_digest(obj)
    except Exception as e:  # noqa: BLE001 - a damaged file can hold values that do not hash
        raise ValueError(_first_line(e)) from None
    if not same:
        raise ValueError("its contents do not match their SHA-256")
    return obj, True


def _first_line(e: BaseException) -> str:
    """The exception's type and first sentence (torch's load errors run to several paragraphs)."""
    text = str(e).strip().splitlines()
    line = text[0].split(". ")[0].rstrip(".") if text else ""
    line = line if len(line) <= 100 else line[:99] + "…"
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def check_writable_folder(path: str | Path) -> None:
    """ValueError (one line) unless ``path`` is, or can be created as, a folder that can be written.

    Checks: not a file; the nearest existing ancestor is a folder, not read-only (no write bit), writable
    by this process (a small probe file is written, synced and removed there) and on a disk with free
    space. Nothing is left behind.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ValueError("is a file, not a folder")
        base = path
        while not base.exists() and base != base.parent:
            base = base.parent
        base = base if base.exists() else Path(".")
        if not base.is_dir():
            raise ValueError(f"{base} is a file, so no folder can be made under it")
        if not base.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError(f"{base} is read-only")
        _probe(base)
    except OSError as e:
        raise ValueError(_os_reason(e, path)) from None


def _probe(folder: Path) -> None:
    if shutil.disk_usage(folder).free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fd, tmp = tempfile.mkstemp(prefix=".baffle-probe-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        Path(tmp).unlink(missing_ok=True)


def _os_reason(e: OSError, path: Path) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write there ({e.strerror})"
    return f"cannot write there ({e.strerror or e})"


__all__ = ["DIGEST_KEY", "atomic_write", "check_writable_folder", "content_digest", "load_checked", "save_checked", "save_json", "save_jsonl",
           "save_torch"]
