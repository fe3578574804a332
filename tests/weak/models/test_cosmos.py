"""Weak model on Cosmos (tiny random config): positional block calls, in-block learnable positional embedding
(STG-R must skip it with the block), video-only `attn1` with per-head RMSNorm and RoPE."""
import copy

import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel
from diffusers.models.normalization import RMSNorm
from torch.overrides import TorchFunctionMode

from stg_ext.weak.adapters import get_adapter

from ._harness import ModelCase, WeakModelTests, run, value_identity




def build():
    # concat_padding_mask=False: the padding-mask path needs torchvision (absent here).
    model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                     num_layers=3, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
                                     max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                     concat_padding_mask=False, extra_pos_embed_type="learnable")
    # The learnable positional embedding is zero-initialized; make it matter.
    for p in model.learnable_pos_embed.parameters():
        torch.nn.init.normal_(p)
    return model.eval()


def skip_block(model, i):
    # Called positionally; the skipped block returns the hidden_states it received (before extra_pos_emb).
    model.transformer_blocks[i].forward = lambda hidden_states, *args, **kwargs: hidden_states


def identity_attn1(model, i):
    value_identity(model.transformer_blocks[i].attn1)


class TestCosmosLearnablePosEmb(WeakModelTests):
    case = ModelCase(
        name="cosmos-learnable-pos-emb",
        build=build,
        inputs=lambda: dict(hidden_states=torch.randn(2, 4, 2, 16, 16), timestep=torch.tensor([500, 500]),
                            encoder_hidden_states=torch.randn(2, 12, 16), attention_mask=torch.ones(2, 12), fps=30),
        n_layers=3,
        reference_residual=skip_block,
        reference_attention=identity_attn1,
        layer_paths=lambda i: f"transformer_blocks.{i}",
    )

    def test_residual_skips_the_positional_embedding(self, model, inputs):
        """A skip that kept the block's own `hidden_states + extra_pos_emb` would be a different weak model."""
        import stg_ext

        wrong = copy.deepcopy(model)
        wrong.transformer_blocks[1].forward = (
            lambda hidden_states, encoder_hidden_states, embedded_timestep, temb, image_rotary_emb, extra_pos_emb,
            *args: hidden_states + extra_pos_emb)
        with stg_ext.perturbed(model, 1, "residual"):
            p = run(model, inputs)
        ref = copy.deepcopy(model)
        skip_block(ref, 1)
        assert torch.equal(p, run(ref, inputs))
        assert (p - run(wrong, inputs)).abs().max() > 0.01 * p.abs().max()


class _SDPAReturnsValue(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return args[2] if len(args) > 2 else kwargs["value"]
        return func(*args, **kwargs)


def test_value_only_follows_the_processor_when_kv_is_narrower():
    """CosmosAttnProcessor2_0 widens K/V to the query's head size (repeat_interleave on dim 3) when their
    projections are narrower; the value-only path must give what the processor gives with SDPA -> V."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build()
        attn = copy.deepcopy(model.transformer_blocks[0].attn1)
        attn.to_k = torch.nn.Linear(24, 12, bias=False)  # 2 heads x 6 features instead of 2 x 12
        attn.to_v = torch.nn.Linear(24, 12, bias=False)
        attn.norm_k = RMSNorm(6, eps=1e-6)
        x = torch.randn(2, 10, 24)
        with torch.no_grad(), _SDPAReturnsValue():
            want = attn(x)
        fn = get_adapter(model).value_only_fn(attn)
        assert fn is not None
        with torch.no_grad():
            got = fn(attn, x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(threads)
