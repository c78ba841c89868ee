"""Durable, verifiable files: the ground floor of every checkpoint and export.

* Atomic directories: everything is written into a hidden sibling and renamed
  into place once complete (:func:`atomic_directory`), so an interrupted save
  leaves the previous version (or nothing), never a mix.
* Integrity: each file's size and sha256, recorded at write time
  (:func:`hash_file`, :func:`write_json`, :func:`save_tensors`) and checked
  before anything is read (:func:`verify_files`).
* Errors that name the file: :class:`CheckpointError`, :func:`read_json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors.torch import save_file

from ..format import FORMAT_VERSION

__all__ = [
    "CheckpointError",
    "PathLike",
    "parse_size",
    "dtype_name",
    "dtype_from_name",
    "short_list",
    "library_version",
    "hash_file",
    "write_json",
    "read_json",
    "fsync_dir",
    "save_tensors",
    "verify_files",
    "check_format_version",
    "missing_dir_hint",
    "atomic_directory",
    "remove_stale_leftovers",
    "pid_alive",
]

_SAFETENSORS_METADATA = {"format": "pt"}
_HASH_CHUNK = 1 << 20

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

PathLike = Union[str, "os.PathLike[str]"]

class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupted, or does not fit the model.

    A ``ValueError`` so callers that already catch bad-argument errors catch
    these too, but a class of its own so a caller can tell "the files are bad"
    apart from a bug elsewhere.
    """


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string such as ``"2GB"``, ``"500MB"``, ``"10KiB"``.

    Decimal units (KB = 1000) follow Hugging Face's ``max_shard_size``, so the
    same string gives the same shards as ``save_pretrained``; binary units
    (KiB = 1024) are accepted for people who mean them.
    """
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int or a string like '2GB'; got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", size.lower())
        if m is None:
            raise ValueError(f"cannot parse size {size!r}; use an int (bytes) or e.g. '2GB', '500MB', '10KB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    else:
        raise TypeError(f"max_shard_size must be an int or a string like '2GB'; got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive; got {size!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"{what}: unknown storage dtype {name!r} (known: {sorted(_DTYPES)})")
    return _DTYPES[name]



def short_list(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _json_default(obj: Any) -> Any:
    # Model configs may hold dtypes or sets; JSON has neither.
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def library_version() -> Optional[str]:
    try:
        from .. import _C

        return _C.__version__
    except Exception:  # pragma: no cover - version is informative only
        return None


# ---------------------------------------------------------------------------
# Durable writes and integrity
# ---------------------------------------------------------------------------


def hash_file(path: Path, fsync: bool = False) -> dict:
    """Size and sha256 of ``path``, read back from disk.

    Hashing what is on disk (not the bytes we meant to write) is what a later
    load will compare against; fsync-ing the same descriptor makes the data
    durable before the directory is renamed into place.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def write_json(path: Path, obj: Any) -> dict:
    data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable; not possible on every OS.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> dict:
    """Write one safetensors file (``metadata`` added to ``{"format": "pt"}``); returns its size and sha256."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu")
        # safetensors refuses tensors that share memory or do not cover their
        # storage; ties were already removed, so any remaining overlap (views of
        # one buffer) is written as separate copies.
        ptr = t.untyped_storage().data_ptr()
        complete = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not complete or (t.numel() and ptr in storages):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            storages.add(ptr)
        out[k] = t
    meta = {**_SAFETENSORS_METADATA, **(metadata or {})}
    save_file(out, str(path), metadata=meta)
    if len(meta) > 1:
        _sort_header_metadata(path, meta)
    return hash_file(path, fsync=True)


def _sort_header_metadata(path: Path, meta: dict[str, str]) -> None:
    """Rewrite the header's ``__metadata__`` object with its keys sorted, in place.

    safetensors keeps metadata in a hash map, so a file with two or more
    metadata keys lists them in an order that changes from process to process,
    and two identical saves would differ byte for byte (and by sha256). The
    sorted object has exactly the same length, so only those bytes change.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        start = header.find(b'"__metadata__":')
        if start < 0:
            return
        start += len(b'"__metadata__":')
        width = len(json.dumps(meta, separators=(",", ":")).encode())
        current = header[start:start + width]
        try:
            if json.loads(current) != meta:
                return  # not the layout this expects; leave the file as written
        except ValueError:
            return
        f.seek(8 + start)
        f.write(json.dumps(dict(sorted(meta.items())), separators=(",", ":")).encode())


def verify_files(directory: Path, files: Any, verify_hash: bool) -> None:
    """Check every recorded file before anything is loaded from it.

    Size first (cheap, catches interrupted copies), then sha256 (catches bit
    rot and partial overwrites that kept the size). Errors name the file.
    """
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{directory}: the config lists no weight files; not a complete qalora_ext checkpoint")
    for name, rec in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{directory}: invalid file name {name!r} in the config")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: checkpoint file {name} is missing")
        try:
            want_size, want_sha = int(rec["size"]), str(rec["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}: bad integrity record for {name} in the config ({e!r})") from e
        size = path.stat().st_size
        if size < want_size:
            raise CheckpointError(f"{directory}: checkpoint file {name} is truncated "
                                  f"({size} bytes on disk, {want_size} expected)")
        if size != want_size:
            raise CheckpointError(f"{directory}: checkpoint file {name} has the wrong size "
                                  f"({size} bytes on disk, {want_size} expected)")
        if verify_hash and hash_file(path)["sha256"] != want_sha:
            raise CheckpointError(f"{directory}: checkpoint file {name} is corrupted (sha256 mismatch)")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a CheckpointError naming the file when it is not one."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not text (not UTF-8: {e.reason} at byte {e.start}); "
                              f"is it a binary file?") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} must hold a JSON object")
    return obj


def check_format_version(version: Any, where: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version} is newer than this qalora_ext reads "
                              f"(up to {FORMAT_VERSION}); upgrade qalora_ext")


def missing_dir_hint(target: Path) -> str:
    # After a crash between the two renames of a replace, the previous
    # checkpoint sits in a hidden sibling; say so rather than just "not found".
    try:
        old = sorted(p.name for p in target.parent.glob(f".{target.name}.old-*"))
    except OSError:
        old = []
    return f" (a previous checkpoint was left at {target.parent / old[0]} by an interrupted save)" if old else ""


# ---------------------------------------------------------------------------
# Atomic directory replacement
# ---------------------------------------------------------------------------


def _unique_sibling(target: Path, tag: str, create: bool) -> Path:
    """A free hidden sibling ``.NAME.TAG-PID-HEX``; the pid tells a later save whether its writer is gone."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        if create:
            try:
                os.mkdir(path)  # honours the umask, unlike mkdtemp's 0700
            except FileExistsError:
                continue
            return path
        if not os.path.lexists(path):
            return path
    raise FileExistsError(f"could not find a free name next to {target}")


_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a writer that is gone left its files behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_leftovers(target: Path) -> list[Path]:
    """Remove what killed saves into ``target`` left next to it; returns what was removed.

    A ``.NAME.tmp-PID-*`` sibling is a half-written save; a ``.NAME.old-PID-*``
    sibling is the previous version renamed aside. Either is ours to remove
    once its writer (PID, on this machine) is gone, except an ``old`` one when
    ``target`` itself is missing: the save died between its two renames and
    that sibling is the only copy of the previous version (load errors name
    it). A save still running (its PID alive) is never touched.
    """
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER_RE.match(entry.name)
        if m is None or m.group("name") != target.name or pid_alive(int(m.group("pid"))):
            continue
        if m.group("tag") == "old" and not os.path.lexists(target):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _copy_directory_attributes(src: Path, dst: Path) -> None:
    """Give ``dst`` the mode, group, ACLs and extended attributes of ``src``, where permitted.

    A re-save replaces the directory; without this a 0700 folder would come
    back 0755 (the umask's) and lose its group and ACLs (ACLs are extended
    attributes on Linux, copied by ``shutil.copystat``).
    """
    st = os.stat(src)
    with contextlib.suppress(OSError):
        shutil.copystat(src, dst)  # mode, times, flags, xattrs (ACLs included)
    with contextlib.suppress(OSError):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    if os.stat(dst).st_gid != st.st_gid:
        with contextlib.suppress(OSError):
            os.chown(dst, -1, st.st_gid)


def _carry_over(old: Path, new: Path, own: Callable[[str], bool]) -> None:
    """Copy into ``new`` what the previous directory held that we do not write.

    A tokenizer or README saved next to the weights must survive a re-save;
    our own files (which may be stale shards of a different count) must not.
    Hard links keep this cheap for large files.
    """
    for entry in os.scandir(old):
        if own(entry.name):
            continue
        dst = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _link_or_copy(src: str, dst: Union[str, Path]) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_directory(directory: PathLike, own: Callable[[str], bool]) -> Iterator[Path]:
    """Yield a temporary sibling of ``directory``; on success move it into place.

    Everything is written next to the target (same filesystem, so the final
    rename is atomic). An existing target is renamed aside and deleted only
    once the new one is in place; on any exception, KeyboardInterrupt
    included, the temporary directory is removed and the old target restored.
    The new directory keeps the old one's mode, group, ACLs and extended
    attributes (where permitted), and files the old one held that ``own``
    does not claim. Leftovers of earlier saves that were killed (``kill -9``:
    no cleanup ran) are removed first (:func:`remove_stale_leftovers`).
    """
    target = Path(os.path.realpath(os.fspath(directory)))
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(target)
    tmp = _unique_sibling(target, "tmp", create=True)
    try:
        if target.is_dir():
            _copy_directory_attributes(target, tmp)
            _carry_over(target, tmp, own)
        yield tmp
        fsync_dir(tmp)
        old = None
        moved_aside = False
        try:
            if os.path.lexists(target):
                old = _unique_sibling(target, "old", create=False)
                os.rename(target, old)
                moved_aside = True
            os.rename(tmp, target)
        except BaseException:
            if moved_aside and not os.path.lexists(target):
                os.rename(old, target)
            raise
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


