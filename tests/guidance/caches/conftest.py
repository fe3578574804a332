import logging

import pytest


@pytest.fixture(autouse=True)
def quiet_diffusers_caches():
    """FasterCache warns at each enable that it is experimental; the tests know."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
