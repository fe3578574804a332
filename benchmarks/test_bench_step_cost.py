"""pytest-benchmark view of bench_step_cost.py: one group per model/mode, the timed parts side by side
(a step of each variant is a sum of parts, see bench_step_cost.step_times):

    .venv/bin/python -m pytest benchmarks/test_bench_step_cost.py --benchmark-enable --benchmark-json=bench_out/step.json
"""
import pytest
import torch

from bench_step_cost import GEOMETRIES, MODES, PARTS, part_fn

_MODELS = {}


def _model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = GEOMETRIES[name].build().eval()
    return _MODELS[name]


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_step_part(benchmark, name, mode, part):
    g = GEOMETRIES[name]
    if part.endswith("batched") and g.convention != "batched" or part.endswith("cond") and g.convention == "batched":
        pytest.skip(f"{g.name} pipelines call the denoiser {g.convention}")
    try:
        fn = part_fn(part, g, mode, _model(name), frames=2)
    except Exception as exc:
        pytest.skip(f"does not run: {type(exc).__name__}: {exc}")
    benchmark.group = f"{name}-{mode}"
    try:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    finally:
        fn.cleanup()
