# Tiny pipelines: one thread, as for the tiny models (thread start-up costs more than the math).
from tests.weak.models.conftest import one_thread  # noqa: F401  (autouse fixture)
