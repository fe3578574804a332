"""pytest-benchmark view of bench_combine.py (same shapes, same candidates), one group per shape/dtype:

    .venv/bin/python -m pytest benchmarks/test_bench_combine.py --benchmark-enable --benchmark-json=bench_out/combine.json
"""
import pytest

from bench_combine import DTYPES, LATENT_SHAPES, candidates, make_latents

CANDIDATES = ["stg_ext_cpu", "eager_reference", "compiled_reference", "torch_add_floor"]


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("model", list(LATENT_SHAPES))
def test_combine(benchmark, model, dtype, candidate):
    fns = candidates(*make_latents(LATENT_SHAPES[model], DTYPES[dtype]))
    if candidate not in fns:
        pytest.skip(f"{candidate} unavailable (stg_ext._C not built)")
    benchmark.group = f"{model}-{dtype}"
    benchmark.pedantic(fns[candidate], rounds=15, warmup_rounds=2)
