"""The weak-model API beyond one family: unsupported targets, handles, an inductor-compiled model."""
import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

import stg_ext
from stg_ext.weak.adapters import supported_models

from .models.test_wan import WAN
from .models._harness import run


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN).eval()
    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32))
    return model, inputs


def test_unsupported_model_lists_supported_classes():
    with pytest.raises(TypeError, match="not a supported denoiser") as err:
        stg_ext.perturbed(nn.Linear(2, 2), 0, "residual")
    assert "WanTransformer3DModel" in str(err.value) and "register_adapter" in str(err.value)
    assert len(supported_models()) >= 4


def test_apply_stg_on_a_non_module_says_what_to_do():
    with pytest.raises(TypeError, match="neither a diffusers pipeline nor a denoiser module"):
        stg_ext.apply_stg(object(), 0, "residual")


def test_handle_is_a_context_manager(wan):
    model, inputs = wan
    c = run(model, inputs)
    with stg_ext.weak_model(model, 1, "residual") as handle:
        assert handle.layer_indices == [1] and not torch.equal(run(model, inputs), c)
    assert torch.equal(run(model, inputs), c)


def test_sequence_of_layers(wan):
    model, inputs = wan
    with stg_ext.perturbed(model, [0, "blocks.2"], "residual") as handle:
        assert handle.layer_indices == [0, 2]
        both = run(model, inputs)
    with stg_ext.perturbed(model, 0, "residual"):
        one = run(model, inputs)
    assert not torch.equal(both, one)


@pytest.mark.dynamo
def test_inductor_compiled_model(wan):
    model, inputs = wan
    torch._dynamo.reset()
    compiled = torch.compile(model)
    for mode in ("residual", "attention"):
        with stg_ext.perturbed(model, 1, mode):
            want = run(model, inputs)
        with stg_ext.perturbed(compiled, 1, mode):
            got = run(compiled, inputs)
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert torch.allclose(run(compiled, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
