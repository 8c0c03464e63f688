"""Local paths and object-storage URIs (s3://, gs://, abfs://, hdfs://...) behind one small API.

URIs go through pyarrow's filesystems, configured the way pyarrow configures them: credentials
and endpoints from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS...).
Anything without "scheme://" (or with file://) is a local path.
"""
from __future__ import annotations

import fnmatch
import re
import threading
from pathlib import Path, PurePosixPath

from .atomic import write_atomic
from .imageio import IMAGE_EXTENSIONS, image_files

_GLOB_CHARS = "*?["
_filesystems: dict[str, object] = {}
_filesystems_lock = threading.Lock()


def is_uri(location: str) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _local(location) -> Path:
    text = str(location)
    return Path(text.removeprefix("file://"))


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0]


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; one filesystem object per scheme and bucket, per process."""
    from pyarrow import fs as pafs

    scheme, rest = uri.split("://", 1)
    rest, _, query = rest.partition("?")
    key = f"{scheme}://{rest.split('/', 1)[0]}"
    with _filesystems_lock:
        if key not in _filesystems:
            if scheme == "s3" and "allow_delayed_open" not in query:
                # Small objects then go up as one PutObject rather than a multipart upload.
                query = "&".join(filter(None, [query, "allow_delayed_open=true"]))
            _filesystems[key] = pafs.FileSystem.from_uri(f"{key}?{query}" if query else key)[0]
    return _filesystems[key], rest.rstrip("/")


def location(value) -> str:
    """A CLI value as a location. `pathlib.Path("s3://b/k")` collapses to "s3:/b/k": that is repaired, so
    a parser declaring `-o` with `type=Path` still reaches the bucket (a local folder "s3:" is never meant)."""
    text = str(value)
    match = re.match(r"^([a-z][a-z0-9+.-]*):/([^/].*)$", text)
    return f"{match.group(1)}://{match.group(2)}" if match and match.group(1) != "file" else text


def absolute(location: str) -> str:
    """A local path made absolute (a URI as it is)."""
    return location if is_uri(location) else str(_local(location).absolute())


def join(base: str, name: str) -> str:
    """`name` inside the folder or prefix `base`."""
    base = str(base)
    if is_uri(base):
        return base.rstrip("/") + "/" + name
    return str(_local(base) / name)


def stem(location: str) -> str:
    return PurePosixPath(str(location).split("://", 1)[-1]).stem


def name(location: str) -> str:
    return PurePosixPath(str(location).split("://", 1)[-1]).name


def list_images(inputs, *, recursive: bool = False, extensions=IMAGE_EXTENSIONS) -> tuple[list[str], list[str]]:
    """Files, folders, globs and URIs -> (sorted, de-duplicated image locations, errors).

    A folder or prefix gives its image files (all levels with `recursive`); a glob matches files;
    an input that matches nothing is an error of its own, not the end of the run."""
    found: list[str] = []
    errors: list[str] = []
    for item in inputs:
        text = str(item)
        try:
            matches = _list_uri(text, recursive, extensions) if is_uri(text) else \
                [str(p) for p in image_files([_local(text)], recursive=recursive, extensions=extensions)]
        except (FileNotFoundError, OSError) as exc:
            errors.append(f"{text}: {exc}")
            continue
        found += [m for m in matches if m not in found]
    return found, errors


def _list_uri(uri: str, recursive: bool, extensions) -> list[str]:
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    prefix = _scheme(uri) + "://"

    def _is_image(name: str) -> bool:
        return PurePosixPath(name).suffix.lower() in extensions

    if any(c in path for c in _GLOB_CHARS):
        root = path[:min(path.index(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        matches = sorted(info.path for info in listing
                         if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.path, path)
                         and _is_image(info.path))
        if not matches:
            raise FileNotFoundError(f"no image file matches {uri}")
        return [prefix + m for m in matches]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.Directory:
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
        return [prefix + i.path for i in sorted(listing, key=lambda i: i.path)
                if i.type == pafs.FileType.File and _is_image(i.path)]
    raise FileNotFoundError(f"no such file or prefix: {uri}")


def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        return _local(location).read_bytes()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(location: str) -> bool:
    if not is_uri(location):
        return _local(location).exists()
    from pyarrow import fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def existing_files(folder: str) -> set[str]:
    """The locations of the files directly in `folder` (one listing: cheaper than a HEAD per output)."""
    if not is_uri(folder):
        local = _local(folder)
        return {str(p) for p in local.iterdir() if p.is_file()} if local.is_dir() else set()
    from pyarrow import fs as pafs

    fs, path = filesystem(folder)
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return {_scheme(folder) + "://" + i.path for i in listing if i.type == pafs.FileType.File}


def write_bytes(data: bytes, location: str, *, overwrite: bool = False) -> None:
    """Writes `data` so that no reader ever sees a partial file.

    Local: a temporary file renamed into place (atomic.write_atomic). Object storage: one
    upload, which the store makes visible only once complete (a PUT, or a multipart upload
    that appears when it is completed). Without `overwrite`, an existing file raises FileExistsError."""
    if not is_uri(location):
        write_atomic(data, _local(location), overwrite=overwrite)
        return
    if not overwrite and exists(location):
        raise FileExistsError(f"{location} exists; pass --overwrite to replace it")
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def make_folder(location: str) -> None:
    if is_uri(location):
        fs, path = filesystem(location)
        fs.create_dir(path, recursive=True)
    else:
        _local(location).mkdir(parents=True, exist_ok=True)
