import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> dict[str, str]:
    """The demo's tiny offline models (tokenizer + LlavaOnevision, open_clip), built once."""
    from jobs.cli import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session; 4 logical CPUs so fractional stages never starve on 2 cores."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
