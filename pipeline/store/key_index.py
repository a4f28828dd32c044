"""Exact lookups of string keys in a large table, built once and shared through Ray's object store.

Planning matches every listed video against the questions file and the record of finished pairs.
Arrow's `is_in` and hash joins rebuild their hash table on every call, which costs the whole
table per batch of videos (quadratic over an archive). A `KeyIndex` hashes the table's keys once
into a sorted uint64 array (numpy: shared zero-copy by every Ray worker on a node); a lookup
hashes only the query keys and binary-searches. Hash matches are confirmed by comparing the keys
themselves, so a 64-bit collision can never make a pending pair look done.

Hashes come from pandas (`hash_pandas_object`: SipHash with a fixed key, the same in every
process). Only the distinct values of a column are hashed, so repeated ids cost one hash each.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier combining the hashes of several key columns


def hash_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash of each string (null hashes like the empty string; keys here are never null)."""
    encoded = pc.dictionary_encode(pc.fill_null(values, ""))
    if isinstance(encoded, pa.ChunkedArray):  # chunks may have different dictionaries
        return np.concatenate([_hash_encoded(c) for c in encoded.chunks]) if encoded.num_chunks \
            else np.empty(0, np.uint64)
    return _hash_encoded(encoded)


def _hash_encoded(encoded: pa.DictionaryArray) -> np.ndarray:
    distinct = pd.Series(encoded.dictionary, dtype=pd.ArrowDtype(pa.string()))
    hashes = pd.util.hash_pandas_object(distinct, index=False).to_numpy(np.uint64)
    return hashes[encoded.indices.to_numpy(zero_copy_only=False)]


def hash_keys(columns: list[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """One uint64 per row over several string key columns."""
    out = np.zeros(len(columns[0]), np.uint64)
    for column in columns:
        out = out * _MIX + hash_strings(column)  # wraps modulo 2**64, as intended
    return out


class KeyIndex:
    """Rows of `keys` (a table of string key columns) found by exact key, several rows per key allowed."""

    def __init__(self, keys: pa.Table):
        keys = keys.combine_chunks()
        hashes = hash_keys(keys.columns)
        self.order = np.argsort(hashes, kind="stable")  # stable: rows of one key keep the table's order
        self.hashes = hashes[self.order]
        self.keys = keys

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, queries: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Every (query row, index row) whose keys are equal, as two aligned int64 arrays; the
        index rows of one query come in the index table's order."""
        if not len(self) or not queries.num_rows:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        h = hash_keys(queries.columns)
        # searching in sorted order walks the index forward (random probes of a large index miss
        # the CPU caches: 4x slower measured at 5M keys)
        by_hash = np.argsort(h)
        lo, hi = np.empty_like(by_hash), np.empty_like(by_hash)
        lo[by_hash] = np.searchsorted(self.hashes, h[by_hash], "left")
        hi[by_hash] = np.searchsorted(self.hashes, h[by_hash], "right")
        counts = hi - lo
        query_rows = np.repeat(np.arange(len(h)), counts)
        # each query's range lo .. lo + count - 1, flattened
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        index_rows = self.order[starts + np.arange(len(query_rows))]
        same = np.ones(len(query_rows), bool)
        for q, k in zip(queries.columns, self.keys.columns):
            same &= pc.equal(q.take(query_rows), k.take(index_rows)).to_numpy(zero_copy_only=False)
        return query_rows[same], index_rows[same]

    def contains(self, queries: pa.Table) -> np.ndarray:
        """Whether each query row's keys are in the index."""
        found = np.zeros(queries.num_rows, bool)
        found[self.lookup(queries)[0]] = True
        return found
