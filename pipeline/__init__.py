"""The Ray Data job and what reads its output, in four rooms over a shared base.

- base (this folder): `config` (the job config, one typed section per stage), `errors` (the error
  reasons every stage writes), `schema` (the output tables' columns), `sources` (filesystems and
  the input files: manifests, question files), `fingerprint` (what produced an answers row, for
  resume). Imports nothing else of pipeline/.
- `store/`: the output store on a filesystem: answers and frames files, the commit record and
  journal, the output lock, compaction. Imports the base only.
- `stages/`: the job's stages, each a class with one method (rows in, rows out) that declares the
  columns it reads and writes: decode, guidance (CLIP), answer (Video-LLM), the output rows.
  Imports the base and the store.
- `run/`: running a job: planning, the stage list with each stage's resources, the chain check,
  the Ray Data pipeline and the driver's commits, metrics. Imports everything above.
- `readers/`: what reads a finished output: search and its index, the report, benchmark question
  files and scoring. Imports the base, the store and the stages (CLIP, decoding); never `run/`.

Imports go one way: base <- store <- stages <- run and readers.
"""
