"""Fixtures for the pipeline tests live in tests/conftest.py (`tiny_model_dir`, `ray_local`), shared
with tests/reliability."""
