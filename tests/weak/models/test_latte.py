"""Weak model on Latte (tiny random config): factorized layers = (transformer_blocks[i], temporal_transformer_blocks[i])."""
import copy

import torch
from diffusers import LatteTransformer3DModel

import stg_ext

from ._harness import TOL, ModelCase, WeakModelTests, run, value_identity

N_LAYERS = 3
LATTE = dict(sample_size=8, num_layers=N_LAYERS, patch_size=2, attention_head_dim=4, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6, video_length=3)


# --- plain references: patch a deep copy ---------------------------------------------------------------

def _return_input(block):
    block.forward = lambda hidden_states, *args, **kwargs: hidden_states


def skip_pair(model, i):
    _return_input(model.transformer_blocks[i])
    _return_input(model.temporal_transformer_blocks[i])


def identity_spatial(model, i):
    value_identity(model.transformer_blocks[i].attn1)


def identity_temporal(model, i):
    value_identity(model.temporal_transformer_blocks[i].attn1)


def identity_both(model, i):
    identity_spatial(model, i)
    identity_temporal(model, i)


REFERENCES = {"residual": skip_pair, "attention": identity_both, "spatial": identity_spatial,
              "temporal": identity_temporal}


class FactorizedWeakModelTests(WeakModelTests):
    """The harness's `_reference` knows only "residual" and one attention patch; factorized models have four
    modes, so pick the plain reference by mode."""

    references = REFERENCES

    def _reference(self, model, inputs, mode, i):
        ref = copy.deepcopy(model)
        self.references[mode](ref, i)
        return run(ref, inputs)


class TestLatte(FactorizedWeakModelTests):
    case = ModelCase(
        name="latte",
        build=lambda: LatteTransformer3DModel(**LATTE).eval(),
        # num_frames must equal video_length (temp_pos_embed is added to the temporal tokens of layer 0).
        inputs=lambda: dict(hidden_states=torch.randn(2, 4, 3, 8, 8), encoder_hidden_states=torch.randn(2, 8, 8),
                            timestep=torch.tensor([500, 500]), enable_temporal_attentions=True),
        n_layers=N_LAYERS,
        reference_residual=skip_pair,
        reference_attention=identity_both,
        modes=("residual", "attention", "spatial", "temporal"),
        layer_paths=lambda i: f"transformer_blocks.{i}",
    )

    def test_either_block_path_names_the_layer(self, model, inputs):
        adapter = stg_ext.weak.adapters.get_adapter(model)
        for i in range(N_LAYERS):
            by_spatial = stg_ext.resolve_layers(adapter, model, f"transformer_blocks.{i}")
            by_temporal = stg_ext.resolve_layers(adapter, model, f"temporal_transformer_blocks.{i}")
            assert [lay.index for lay in by_spatial] == [lay.index for lay in by_temporal] == [i]
        with stg_ext.perturbed(model, 1, "residual"):
            want = run(model, inputs)
        with stg_ext.perturbed(model, "temporal_transformer_blocks.1", "residual"):
            assert torch.equal(run(model, inputs), want)
        # Both paths of one layer count once.
        assert len(stg_ext.resolve_layers(adapter, model, ["transformer_blocks.1", "temporal_transformer_blocks.1"])) == 1

    def test_modes_touch_the_right_modules(self, model):
        paths = {}
        for mode in self.case.modes:
            with stg_ext.perturbed(model, 1, mode):
                paths[mode] = sorted(path for path, m in model.named_modules() if hasattr(m, "_diffusers_hook"))
        assert paths == {
            "residual": ["temporal_transformer_blocks.1", "transformer_blocks.1"],
            "attention": ["temporal_transformer_blocks.1.attn1", "transformer_blocks.1.attn1"],
            "spatial": ["transformer_blocks.1.attn1"],
            "temporal": ["temporal_transformer_blocks.1.attn1"],
        }
        assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())

    def test_value_only_falls_back_when_the_processor_does_more(self, model, inputs):
        # rescale_output_factor != 1 divides the attention output: to_out(to_v(x)) alone would be wrong, so the
        # adapter must take the exact interception path for that module.
        odd = copy.deepcopy(model)
        odd.temporal_transformer_blocks[2].attn1.rescale_output_factor = 2.0
        adapter = stg_ext.weak.adapters.get_adapter(odd)
        targets = adapter.attention_targets(adapter.layers(odd)[2], "attention")
        assert [t.value_only is None for t in targets] == [False, True]
        with stg_ext.perturbed(odd, 2, "temporal"):
            p = run(odd, inputs)
        ref = copy.deepcopy(odd)
        attn = ref.temporal_transformer_blocks[2].attn1
        value_identity(attn)
        plain = attn.forward
        attn.forward = lambda hidden_states, *a, **k: plain(hidden_states) / 2.0
        want = run(ref, inputs)
        assert (p - want).abs().max().item() <= TOL * want.abs().max().item()

    def test_compiles_without_graph_breaks(self, inputs, monkeypatch):
        # A graph break in a hook inside Latte's block loop makes dynamo run the whole forward eagerly (for good).
        # The first perturbed call is the one at risk: start with no signature cached for the blocks.
        from diffusers.models.attention import BasicTransformerBlock

        from stg_ext.weak.adapters import base

        monkeypatch.delitem(base._PARAMS, BasicTransformerBlock, raising=False)
        torch.manual_seed(0)
        fresh = LatteTransformer3DModel(**dict(LATTE, num_layers=1)).eval()
        torch._dynamo.reset()
        try:
            for mode in ("residual", "attention"):
                with torch.no_grad(), stg_ext.perturbed(fresh, 0, mode):
                    explained = torch._dynamo.explain(fresh)(**inputs, return_dict=False)
                assert (explained.graph_count, explained.graph_break_count) == (1, 0), (mode, explained.break_reasons)
        finally:
            torch._dynamo.reset()
