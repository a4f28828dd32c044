"""Which videos a job reads, as a Ray Dataset read and listed by Ray tasks (`list_videos`), or as
one Arrow table for inputs small enough to plan on the driver (`listing_table`).

A manifest (Parquet, JSONL or CSV; local or object storage) is read by Ray Data. A glob is split
at its first wildcard: the driver lists the fixed prefix's top level once and each matching
sub-prefix is globbed by its own Ray task, so an archive of many folders is listed in parallel.
Rows are VIDEO_SCHEMA; duplicates are resolved later, in planning (pipeline/run/planning.py).
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
from typing import Any

import pyarrow as pa

from pipeline.config import ConfigError, InputConfig, StorageConfig
from pipeline.schema import Col
from pipeline.sources import filesystem, full_uri, glob_root, read_dataset, read_table

# The listing's rows; size_bytes is -1 when unknown (manifests do not carry sizes).
VIDEO_SCHEMA = pa.schema([(Col.VIDEO_ID, pa.string()), (Col.VIDEO_URI, pa.string()), (Col.SIZE_BYTES, pa.int64())])
log = logging.getLogger("moref_index")
_UNIT_SCHEMA = pa.schema([("url", pa.string()), ("root", pa.string())])  # split_glob's units


def list_videos(cfg: InputConfig):
    """The job's videos as a lazy Ray Dataset of VIDEO_SCHEMA rows (an id may repeat)."""
    if cfg.manifest:
        return read_dataset(cfg.manifest, cfg.storage, "input.manifest").map_batches(
            manifest_rows, fn_kwargs={"base": posixpath.dirname(cfg.manifest)}, batch_format="pyarrow",
            batch_size=None)
    import ray

    units = [unit for pattern in cfg.videos or [] for unit in split_glob(pattern, cfg.storage)]
    if not units:
        raise ConfigError(f"input.videos: no files match {cfg.videos}")
    # one unit per block, so each sub-prefix is listed by its own task
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        glob_unit, fn_kwargs={"storage": cfg.storage}, batch_format="pyarrow", batch_size=1)


def listing_table(cfg: InputConfig) -> pa.Table:
    """The same listing read in this process, for inputs small enough to plan on the driver."""
    if cfg.manifest:
        table = read_table(cfg.manifest, cfg.storage, "input.manifest")
        return manifest_rows(table, base=posixpath.dirname(cfg.manifest))
    units = [unit for pattern in cfg.videos or [] for unit in split_glob(pattern, cfg.storage)]
    return glob_unit(pa.Table.from_pylist(units, schema=_UNIT_SCHEMA), cfg.storage)


def manifest_rows(batch: pa.Table, base: str) -> pa.Table:
    """A manifest's rows as VIDEO_SCHEMA: `video_uri` (or `uri`), relative URIs joined to the
    manifest's folder, `video_id` as text (default: the URI's file name)."""
    uri_col = "video_uri" if "video_uri" in batch.column_names else "uri"
    if uri_col not in batch.column_names:
        raise ConfigError(f"input.manifest: missing column(s) ['video_uri']; found {batch.column_names}")
    raw = batch.column(uri_col).to_pylist()
    if None in raw:
        raise ConfigError(f"input.manifest: {raw.count(None)} row(s) have no {uri_col}")
    uris = [str(u) for u in raw]
    absolute = [u if "://" in u or u.startswith("/") else posixpath.join(base, u) for u in uris]
    if Col.VIDEO_ID in batch.column_names:
        given = batch.column(Col.VIDEO_ID).to_pylist()
        if None in given:
            raise ConfigError(f"input.manifest: {given.count(None)} row(s) have no video_id")
        ids = [str(i) for i in given]
    else:
        ids = [posixpath.basename(u) for u in uris]
    return pa.table([pa.array(ids, pa.string()), pa.array(absolute, pa.string()),
                     pa.array([-1] * len(ids), pa.int64())], schema=VIDEO_SCHEMA)


def split_glob(pattern: str, storage: StorageConfig) -> list[dict[str, Any]]:
    """The glob as units that list independently: {"url": glob URL, "root": the original glob's
    fixed prefix (ids are relative to it)}. A pattern with folders after its first wildcard is split
    by the fixed prefix's sub-folders (one listing of the top level); a flat one is one unit."""
    fs, path = filesystem(pattern, storage)
    root = glob_root(path)
    rest = path[len(root):].lstrip("/") if root else path
    head, _, tail = rest.partition("/")
    whole = [{"url": pattern, "root": root}]
    if not tail or not fs.exists(root or "/"):
        return whole
    subdirs = [e["name"].rstrip("/") for e in fs.ls(root or "/", detail=True) if e.get("type") == "directory"]
    if head == "**":  # zero folders (the top level itself) or any depth below each sub-folder
        paths = [f"{root}/{tail}"] + [f"{d}/**/{tail}" for d in subdirs]
    else:
        paths = [f"{d}/{tail}" for d in subdirs if fnmatch.fnmatchcase(posixpath.basename(d), head)]
    return [{"url": full_uri(fs, p), "root": root} for p in paths]


def glob_unit(batch: pa.Table, storage: StorageConfig) -> pa.Table:
    """Runs in a Ray task: the files matching each unit, as VIDEO_SCHEMA rows."""
    ids: list[str] = []
    uris: list[str] = []
    sizes: list[int] = []
    for url, root in zip(batch.column("url").to_pylist(), batch.column("root").to_pylist()):
        fs, path = filesystem(url, storage)
        # folders a local walk could not list (unreadable): reported, not silent (an object store's
        # listing has no unreadable folders: a refused listing raises)
        unlisted: list[OSError] = []
        local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
        options = {"on_error": unlisted.append} if local else {}
        matches = fs.glob(path, detail=True, **options) if fs.exists(glob_root(path) or "/") else {}
        for exc in unlisted:
            log.warning("input.videos: cannot list folder %s (%s): its videos are left out",
                        getattr(exc, "filename", None) or url, getattr(exc, "strerror", None) or exc)
        for name, info in sorted(matches.items()):
            if info.get("type") == "directory":
                continue
            ids.append(posixpath.relpath(name, root) if root else name)
            uris.append(full_uri(fs, name))
            size = info.get("size")
            sizes.append(-1 if size is None else int(size))
    return pa.table([pa.array(ids, pa.string()), pa.array(uris, pa.string()), pa.array(sizes, pa.int64())],
                    schema=VIDEO_SCHEMA)
