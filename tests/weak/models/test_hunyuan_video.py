"""Weak model on HunyuanVideo (tiny random configs): 2 dual-stream + 2 single-stream blocks (STG layers 0, 1
dual; 2, 3 single), joint attention `attn`, video first, right-padded text hidden by a boolean key mask."""
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

import stg_ext

from ._harness import ModelCase, WeakModelTests, joint_identity




CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
              pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
N_DUAL = CONFIG["num_layers"]


def block(model, i):
    return model.transformer_blocks[i] if i < N_DUAL else model.single_transformer_blocks[i - N_DUAL]


def path(i):
    return f"transformer_blocks.{i}" if i < N_DUAL else f"single_transformer_blocks.{i - N_DUAL}"


def skip_block(model, i):
    # Called positionally with 7 arguments; both block kinds return (video, text).
    block(model, i).forward = (
        lambda hidden_states, encoder_hidden_states, *args, **kwargs: (hidden_states, encoder_hidden_states))


def identity_attn(model, i):
    joint_identity(block(model, i).attn, video_first=True)


def inputs():
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 8), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 8, 32),
                encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 3, [1] * 8]),
                pooled_projections=torch.randn(2, 16), guidance=torch.tensor([6000.0, 6000.0]))


def case(name, **config):
    return ModelCase(name=name, build=lambda: HunyuanVideoTransformer3DModel(**{**CONFIG, **config}).eval(),
                     inputs=inputs, n_layers=4, reference_residual=skip_block, reference_attention=identity_attn,
                     layer_paths=path)


class TwoBlockLists:
    """HunyuanVideo's block lists (2 dual-stream, then 2 single-stream), shared by the models built of its blocks."""

    def _layers(self):
        return [0, 1, 2, 3]  # both dual and both single blocks

    def test_two_lists_in_execution_order(self, model):
        adapter = stg_ext.weak.adapters.get_adapter(model)
        for i in range(4):
            assert [lay.index for lay in stg_ext.resolve_layers(adapter, model, path(i))] == [i]
            assert stg_ext.resolve_layers(adapter, model, i)[0].modules == (block(model, i),)


class TestHunyuanVideo(TwoBlockLists, WeakModelTests):
    case = case("hunyuan-video")

    def test_two_lists_in_execution_order(self, model):
        super().test_two_lists_in_execution_order(model)
        adapter = stg_ext.weak.adapters.get_adapter(model)
        assert [lay.index for lay in stg_ext.resolve_layers(adapter, model, [-2, "transformer_blocks.0"])] == [2, 0]


class TestHunyuanVideoTokenReplace(WeakModelTests):
    # I2V: HunyuanVideoTokenReplace(Single)TransformerBlock, first-frame tokens modulated by token_replace_emb.
    case = case("hunyuan-video-token-replace", image_condition_type="token_replace")

    def test_compiled_model(self, model, inputs):
        pytest.skip("same hooks and processor as TestHunyuanVideo, whose compiled test covers them (~20 s each)")
