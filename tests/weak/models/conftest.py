import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: thread start-up costs more than the math (a 7 ms forward takes ~0.4 s with 2 threads
    # on a busy 2-core machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The shared fixtures of WeakModelTests (tests/weak/models/_harness.py): one model, inputs and stock output per
# test class, built from the class's ModelCase.
@pytest.fixture(scope="class")
def model(request):
    torch.manual_seed(0)
    return request.cls.case.build()


@pytest.fixture(scope="class")
def inputs(request):
    torch.manual_seed(1)
    return request.cls.case.inputs()


@pytest.fixture(scope="class")
def cond(model, inputs):
    from ._harness import run

    return run(model, inputs)
