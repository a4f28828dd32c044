"""The output store: answers and frames Parquet files on any fsspec filesystem, the commit record
and supersede journal that make reruns exactly-once, the key index planning looks pairs up in,
the output lock and compaction. Imports only the base (config, errors, schema, sources); the
stages, the run and the readers build on it."""
