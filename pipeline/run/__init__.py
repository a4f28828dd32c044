"""Running a job: plan the pending work, list the stages with the resources each asks for, check
the chain of columns, build and drive the Ray Data pipeline, commit its rows, record metrics.
The Ray-facing modules live here (runner, planning, listing, metrics); besides them only
store/file_merge.py (one Ray task) and sources.py (`read_dataset`) import Ray. May import every
other room; nothing imports it but the CLI and the benchmarks."""
