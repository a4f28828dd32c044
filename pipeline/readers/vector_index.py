"""The approximate nearest-neighbour index over the frames table, for archives of ~1M frames and more.

faiss IVF-Flat (inner product on the L2-normalised embeddings): a coarse k-means quantiser sends
each frame to one of `nlist` lists and a search scans only the `nprobe` lists nearest the query,
with exact float32 scores. (8-bit codes were tried: a quarter of the size, but their rounding
reorders near neighbours and held recall@10 at 0.935 at 1M frames whatever `nprobe`.) The index
is memory-mapped on load, so a query reads only the lists it scans. The search returns candidate frames;
`pipeline.readers.search` then scores the candidates' videos exactly, so approximation can only miss a
video, never misplace a moment.

Stored under OUTPUT/search-index/, next to the tables it indexes:
    state.json           what is indexed: frames file -> fingerprint (size + ETag/mtime), the
                         names of the index and id-map files, the next free id
    ivf-<uuid>.faiss     the faiss index; ids are int64 keys into the id map
    ids-<uuid>.parquet   id -> (video_id, frames file)
state.json is written last and names the other two, so a reader sees one complete version;
files of older versions are deleted after the switch.

Maintained incrementally: `sync` compares frames/ with state.json, removes the ids of files that
changed or went away and adds the frames of new or changed files, without retraining the
quantiser (a run adds frames of the same model; `rebuild=True` retrains from scratch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.schema import Col

log = logging.getLogger("moref_index")

INDEX_DIR = "search-index"
STATE_FILE = "state.json"
# Lists of about sqrt(N) frames each: the usual IVF balance of quantiser cost against list scans.
MIN_LISTS, MAX_LISTS = 16, 8192
TRAIN_POINTS_PER_LIST = 64  # k-means sample: faiss warns below 39 per centroid
KMEANS_ITERATIONS = 10
DEFAULT_NPROBE = 48  # lists scanned per query; recall@10 >= 0.95 at 1M frames (bench/bench_search.py)
DEFAULT_CANDIDATES = 1000  # frames the index returns per query before exact rescoring
ADD_BATCH_ROWS = 65_536


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("MOREF_INDEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moref-index")
    return pathlib.Path(root)


def fingerprint(info: dict) -> str:
    """Changes whenever a frames file is rewritten: size plus ETag (object stores) or mtime."""
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{stamp}"


class VectorIndex:
    """The faiss index of one output's frames table (`pipeline.readers.search.FramesIndex`)."""

    def __init__(self, frames, nprobe: int = DEFAULT_NPROBE):
        self.frames = frames
        self.store = frames.store
        self.nprobe = nprobe
        self._loaded: tuple[str, object, pa.Table] | None = None

    # ---- state

    def _path(self, name: str) -> str:
        return self.store.path(INDEX_DIR, name)

    def state(self) -> dict | None:
        path = self._path(STATE_FILE)
        self.store._invalidate()
        if not self.store.fs.exists(path):
            return None
        with self.store.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def exists(self) -> bool:
        return self.state() is not None

    def frames_files(self) -> dict[str, str]:
        """Name -> fingerprint of every frames file now."""
        from pipeline.store.output_store import FRAMES_DIR

        base = self.store.path(FRAMES_DIR)
        self.store._invalidate()
        if not self.store.fs.exists(base):
            return {}
        # one listing with details, not a request per file; on local disk os.walk and os.stat,
        # 1.5-5x cheaper than fsspec's local `find` (334 files, a loaded 2-core machine; each query lists frames/)
        listing = _local_listing(base) if self.store._local else self.store.fs.find(base, detail=True)
        names = {p.rsplit("/", 1)[-1]: info for p, info in listing.items()}
        return {n: fingerprint(info) for n, info in names.items()
                if n.endswith(".parquet") and not n.startswith(("_", "."))}

    def stale_files(self, state: dict | None = None) -> tuple[list[str], list[str]]:
        """(files to remove from the index, files to add to it)."""
        state = state if state is not None else self.state() or {"files": {}}
        now, indexed = self.frames_files(), state["files"]
        removed = sorted(n for n, fp in indexed.items() if now.get(n) != fp)
        added = sorted(n for n, fp in now.items() if indexed.get(n) != fp)
        return removed, added

    # ---- building and maintenance

    def sync(self, rebuild: bool = False) -> dict:
        """Bring the index up to date with frames/; returns the new state. Builds it when missing."""
        import faiss

        state = None if rebuild else self.state()
        removed, added = self.stale_files(state)
        if state is not None and not removed and not added:
            return state
        if state is None:
            index, ids, next_id = self._trained_index(added), _empty_id_map(), 0
            removed = []
        else:
            index, ids = self._read(state)
            next_id = state["next_id"]
        if removed:
            gone = pc.is_in(ids.column("file"), pa.array(removed, pa.string()))
            index.remove_ids(faiss.IDSelectorBatch(ids.filter(gone).column("id").to_numpy()))
            ids = ids.filter(pc.invert(gone))
        new_ids = [ids]
        for table in self._batches(added):
            vectors = _embeddings(table)
            keys = np.arange(next_id, next_id + len(vectors), dtype=np.int64)
            index.add_with_ids(vectors, keys)
            new_ids.append(pa.table({"id": keys, Col.VIDEO_ID: table.column(Col.VIDEO_ID),
                                     "file": table.column("file")}))
            next_id += len(vectors)
        files = {} if state is None else {n: fp for n, fp in state["files"].items() if n not in removed}
        files.update({n: fp for n, fp in self.frames_files().items() if n in added})
        return self._commit(index, pa.concat_tables(new_ids), files, next_id, state)

    def _trained_index(self, files: list[str]):
        import faiss

        total = self.frames.count()
        if total == 0:
            raise ValueError("no frames to index")
        dim = self.frames.embedding_dim()
        nlist = int(np.clip(round(np.sqrt(total)), MIN_LISTS, MAX_LISTS))
        nlist = min(nlist, max(1, total // TRAIN_POINTS_PER_LIST) or 1)
        sample = self._training_sample(files, total, nlist * TRAIN_POINTS_PER_LIST)
        quantiser = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantiser, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = 0
        index.train(sample)
        log.info("trained a %d-list IVF-Flat index on %d of %d frames", nlist, len(sample), total)
        return index

    def _training_sample(self, files: list[str], total: int, want: int) -> np.ndarray:
        rng = np.random.default_rng(0)
        share = min(1.0, want / total)
        parts = []
        for table in self._batches(files):
            n = len(table)
            pick = rng.random(n) < share
            parts.append(_embeddings(table.filter(pa.array(pick))))
        return np.ascontiguousarray(np.concatenate(parts))

    def _batches(self, names: Sequence[str]) -> Iterator[pa.Table]:
        """Tables of (video_id, embedding, file) over the given frames files, batch by batch."""
        from pipeline.store.output_store import FRAMES_DIR

        paths = [self.store.path(FRAMES_DIR, n) for n in names]
        for start in range(0, len(paths), 256):
            chunk = paths[start : start + 256]
            ds = pads.dataset(chunk, filesystem=self.store.fs, format="parquet")
            for batch in ds.to_batches(columns=[Col.VIDEO_ID, Col.EMBEDDING, "__filename"], batch_size=ADD_BATCH_ROWS):
                names_ = [f.rsplit("/", 1)[-1] for f in batch.column("__filename").to_pylist()]
                yield pa.table({Col.VIDEO_ID: batch.column(Col.VIDEO_ID), Col.EMBEDDING: batch.column(Col.EMBEDDING),
                                "file": pa.array(names_, pa.string())})

    def _commit(self, index, ids: pa.Table, files: dict, next_id: int, old: dict | None) -> dict:
        import faiss

        version = uuid.uuid4().hex[:12]
        state = {"index_file": f"ivf-{version}.faiss", "ids_file": f"ids-{version}.parquet",
                 "files": files, "next_id": next_id, "frames": int(index.ntotal), "nlist": int(index.nlist)}
        self.store.write_bytes(faiss.serialize_index(index).tobytes(), INDEX_DIR, state["index_file"])
        self.store.write_table(ids, INDEX_DIR, state["ids_file"])
        self.store.write_json(state, INDEX_DIR, STATE_FILE)
        if old is not None:
            for name in (old["index_file"], old["ids_file"]):
                self.store.remove(self._path(name))
        self._loaded = None
        log.info("search index: %d frames in %d lists", state["frames"], state["nlist"])
        return state

    # ---- reading

    def _local_copy(self, name: str) -> str:
        """A local path of an index file: itself when local, else a cached download (names are
        unique per version, so a cached file never goes stale)."""
        path = self._path(name)
        if self.store._local:
            return path
        digest = hashlib.sha256(self.store.root.encode()).hexdigest()[:16]
        local = _cache_dir() / digest / name
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"_tmp-{uuid.uuid4().hex}")
            self.store.fs.get(path, str(tmp))
            tmp.replace(local)
        return str(local)

    def _read(self, state: dict, mmap: bool = False):
        import faiss

        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(self._local_copy(state["index_file"]), flags)
        # Read-only (a query): the strings as dictionaries, 7x faster at 1M rows; sync appends plain strings.
        strings = [Col.VIDEO_ID, "file"] if mmap else None
        ids = pq.read_table(self._local_copy(state["ids_file"]), read_dictionary=strings)
        return index, ids

    def _open(self, state: dict):
        if self._loaded is None or self._loaded[0] != state["index_file"]:
            self._loaded = (state["index_file"], *self._read(state, mmap=True))
        return self._loaded[1], self._loaded[2]

    def synced_state(self, update: bool = True) -> dict:
        """The index state after bringing it up to date (`update`), or as it is."""
        state = self.state()
        if update or state is None:
            return self.sync() if state is None or any(self.stale_files(state)) else state
        removed, added = self.stale_files(state)
        if removed or added:
            log.warning("search index is behind frames/ by %d file(s); run `moref-index index`",
                        len(set(removed) | set(added)))
        return state

    def nearest(self, query: np.ndarray, k: int, state: dict,
                video_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(approximate scores, video ids) of the k frames most similar to the query."""
        import faiss

        index, ids = self._open(state)
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, index.nlist))
        if video_ids is not None:
            keep = pc.is_in(ids.column(Col.VIDEO_ID), pa.array(list(video_ids), pa.string()))
            params.sel = faiss.IDSelectorBatch(ids.filter(keep).column("id").to_numpy())
        scores, keys = index.search(np.asarray(query, np.float32).reshape(1, -1), k, params=params)
        scores, keys = scores[0], keys[0]
        found = keys >= 0
        scores, keys = scores[found], keys[found]
        # ids are sorted by construction (appended in increasing order; removals keep the order)
        id_column = ids.column("id").to_numpy()
        rows = np.searchsorted(id_column, keys)
        video = np.asarray(ids.column(Col.VIDEO_ID).take(pa.array(rows)).to_pylist(), dtype=object)
        return scores, video

    def video_files(self, state: dict, video_ids: Sequence[str]) -> list[str]:
        """Paths of the frames files holding the given videos, by the id map of `state` (true of
        frames/ when `state` is synced)."""
        from pipeline.store.output_store import FRAMES_DIR

        _, ids = self._open(state)
        held = ids.filter(pc.is_in(ids.column(Col.VIDEO_ID), pa.array(list(video_ids), pa.string())))
        return [self.store.path(FRAMES_DIR, name) for name in sorted(set(held.column("file").to_pylist()))]

    def candidate_videos(self, query: np.ndarray, state: dict, min_score: float, max_videos: int,
                         video_ids: Sequence[str] | None = None,
                         candidates: int = DEFAULT_CANDIDATES) -> list[str]:
        """The videos of the best candidate frames scoring near or above min_score, best first."""
        scores, videos = self.nearest(query, candidates, state, video_ids)
        keep = scores >= min_score
        return list(dict.fromkeys(videos[keep].tolist()))[:max_videos]


def _local_listing(base: str) -> dict[str, dict]:
    """Path -> {size, mtime} of the files under a local folder, as fsspec's local `find` gives them."""
    found = {}
    for folder, _, names in os.walk(base):
        for name in names:
            st = os.stat(f"{folder}/{name}")
            found[f"{folder}/{name}"] = {"size": st.st_size, "mtime": st.st_mtime}
    return found


def _empty_id_map() -> pa.Table:
    return pa.table({"id": pa.array([], pa.int64()), Col.VIDEO_ID: pa.array([], pa.string()),
                     "file": pa.array([], pa.string())})


def _embeddings(table: pa.Table) -> np.ndarray:
    from pipeline.readers.search import embedding_matrix

    return np.ascontiguousarray(embedding_matrix(table.column(Col.EMBEDDING)))

