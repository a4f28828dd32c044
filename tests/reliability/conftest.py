import pytest

from tests.reliability.helpers import TINY


@pytest.fixture(scope="session", autouse=True)
def tiny_models(tiny_model_dir):
    TINY.update(tiny_model_dir)
