import pytest
import torch._dynamo
from torch._dynamo.utils import counters

# Tiny pipelines: one thread, as for the tiny models (thread start-up costs more than the math).
from tests.weak.models.conftest import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after the test, so graph and break counts are its own."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
