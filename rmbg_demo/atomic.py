"""Outputs appear whole or not at all: written under a temporary name beside the target, then moved
into place. The one helper for images, exports, videos, frame folders and zips.

Without `overwrite` an existing output is never replaced, even one that another writer creates in
the meantime: the final step is a hard link (files) or a rename onto a missing name (folders),
which fail rather than replace.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def temporary_beside(path: Path, *, folder: bool = False) -> Path:
    """A fresh name beside `path` (same file system, so the final move is atomic), created with the
    permissions the umask gives (mkstemp's 0600 would make the output private). Keeps the suffix, so
    writers that choose a format by extension still can."""
    path = Path(path)
    for _ in range(100):
        name = path.parent / f".{path.stem}.{secrets.token_hex(4)}.part{'' if folder else path.suffix}"
        try:
            if folder:
                name.mkdir()
            else:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def discard(path: Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


def commit(temporary: Path, final: Path, *, overwrite: bool = False) -> Path:
    """Moves a finished temporary (file or folder) to `final`."""
    temporary, final = Path(temporary), Path(final)
    _sync(temporary)
    if temporary.is_dir():
        if final.exists():
            if not overwrite:
                raise _exists_error(final)
            old = temporary_beside(final, folder=True)
            os.replace(final, old / final.name)
            os.replace(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temporary, final)
    elif overwrite:
        os.replace(temporary, final)
    else:
        try:
            os.link(temporary, final)
        except FileExistsError:
            raise _exists_error(final) from None
        temporary.unlink()
    return final


def commit_together(moves: list[tuple[Path, Path]], *, overwrite: bool = False) -> None:
    """Moves finished temporaries to their places in the order given, all or none: when one cannot be
    placed (its target appeared meanwhile, without `overwrite`), those already placed are removed again."""
    committed: list[Path] = []
    try:
        for temporary, final in moves:
            committed.append(commit(temporary, final, overwrite=overwrite))
    except BaseException:
        for path in committed:
            discard(path)
        raise


@contextlib.contextmanager
def atomic_outputs(paths: dict[str, Path], *, overwrite: bool = False,
                   folders: frozenset[str] = frozenset()) -> Iterator[dict[str, Path]]:
    """Temporaries for several outputs that appear together: yields {kind: temporary path}; on a clean
    exit each is committed (if one cannot be, those already committed are removed again: all or none);
    on an error every temporary is removed. `folders`: the kinds that are folders."""
    paths = {kind: Path(path) for kind, path in paths.items()}
    if not overwrite:
        for path in paths.values():
            if path.exists():
                raise _exists_error(path)
    temporaries: dict[str, Path] = {}
    try:
        for kind, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries[kind] = temporary_beside(path, folder=kind in folders)
        yield temporaries
        commit_together([(temporaries[kind], path) for kind, path in paths.items()], overwrite=overwrite)
    finally:
        for temporary in temporaries.values():
            discard(temporary)


@contextlib.contextmanager
def atomic_output(path, *, overwrite: bool = False, folder: bool = False) -> Iterator[Path]:
    """One output: yields the temporary path to write; see `atomic_outputs`."""
    with atomic_outputs({"out": Path(path)}, overwrite=overwrite,
                        folders=frozenset({"out"}) if folder else frozenset()) as temporaries:
        yield temporaries["out"]


def write_atomic(data: bytes, path, *, overwrite: bool = False) -> Path:
    """`data` as the whole of `path`, never a half-written file."""
    with atomic_output(path, overwrite=overwrite) as temporary:
        temporary.write_bytes(data)
    return Path(path)
