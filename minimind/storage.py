"""Files every node can reach: a stage's inputs go through the run's Ray storage.

On a real cluster the driver's disk is its own: a GPU node started by the autoscaler sees neither the
driver's checkout nor its caches. So before any worker starts, the driver copies each input that exists
only on its disk (the starting model, DPO's reference, the KD teacher, the VLM tower, the data files and
image folder) into the run's folder on Ray storage, which every node reads (a shared folder, `s3://`,
`gs://`, or any filesystem pyarrow opens, as Ray Train's own checkpoints do). Workers get URIs and fetch
them into a node-local cache themselves.

    driver:  staged = stage_input(Path("checkpoints/runs/sft-1/init"), "s3://bucket/runs/sft-1/inputs")
    worker:  local = fetch(staged)      # a path on this node
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem_of(location: str):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def join(location: str, *names: str) -> str:
    return "/".join([location.rstrip("/"), *names])


def stage_input(local: str | Path, destination: str) -> str:
    """Copy a local file or folder to `destination` (a URI or a folder every node sees) and return it."""
    import pyarrow.fs

    local = Path(local).resolve()
    filesystem, path = filesystem_of(destination)
    parent = path if local.is_dir() else path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem)
    return destination


def exists(location: str) -> bool:
    import pyarrow.fs

    filesystem, path = filesystem_of(location)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def node_cache() -> Path:
    """This node's cache of fetched inputs (the same on every run, so a node fetches an input once)."""
    root = Path(os.environ.get("MINIMIND_NODE_CACHE", Path(tempfile.gettempdir()) / "minimind-node-cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch(location: str) -> Path:
    """A local path for `location`: a local path as it is (it must exist here), a URI downloaded once
    into this node's cache. A partial download never looks complete: it is renamed into place at the end."""
    import pyarrow.fs

    if not is_uri(location):
        path = Path(location)
        if not path.exists():
            raise FileNotFoundError(f"{location} does not exist on this node ({os.uname().nodename}); "
                                    "inputs for workers must be on storage every node reaches")
        return path
    filesystem, path = filesystem_of(location)
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{location} does not exist")
    target = node_cache() / hashlib.sha256(location.encode()).hexdigest()[:16] / info.base_name
    if not target.exists():
        partial = Path(tempfile.mkdtemp(dir=node_cache(), prefix=".partial-")) / info.base_name
        if info.type == pyarrow.fs.FileType.Directory:
            partial.mkdir()
        pyarrow.fs.copy_files(
            path, str(partial), source_filesystem=filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem()
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(partial, target)
        except OSError:  # another worker on this node finished first
            pass
        shutil.rmtree(partial.parent, ignore_errors=True)
    return target


def file_sha256(path: str | Path) -> str:
    """The sha256 of a whole local file, read in 8 MiB blocks (a multi-gigabyte file never sits in memory):
    what identifies its content, whatever its mtime says."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
