"""Stable Video Diffusion's UNet (UNetSpatioTemporalConditionModel): factorized, a layer is one
`TransformerSpatioTemporalModel` (STG_SPEC section 3, "Factorized models").

Layers, in EXECUTION order: the transformer modules (`attentions`) of `down_blocks[0..]`, then `mid_block`,
then `up_blocks[0..]` — 16 for the released config:

    0-5  down_blocks.{0,1,2}.attentions.{0,1}     6  mid_block.attentions.0
    7-15 up_blocks.{1,2,3}.attentions.{0,1,2}

(`named_modules()` lists `mid_block` last, because it is registered after `up_blocks`; its order is not the
execution order.) The paper's "8th layer of SVD" is index 7, `up_blocks.1.attentions.0`.

Each module is called `attn(hidden_states, encoder_hidden_states=, image_only_indicator=, return_dict=False)`
and returns `(output,)` (or a `TransformerTemporalModelOutput` with `return_dict=True`), where
`output = proj_out(...) + hidden_states`. Inside, per sub-layer k: the spatial `transformer_blocks[k]`
(BasicTransformerBlock; `attn1` self-attention over the H·W positions of a frame, `attn2` cross-attention to
the image embedding) and the temporal `temporal_transformer_blocks[k]` (TemporalBasicTransformerBlock;
`attn1` self-attention over the frames of a position, called `attn1(x, encoder_hidden_states=None)`, `attn2`
cross-attention to the image embedding), mixed by `time_mixer`.

Modes:
- "residual": the module returns its input, in its own return type;
- "attention": every spatial and temporal `attn1` of the module is the identity (value, then `to_out`);
- "spatial" / "temporal": only the spatial / temporal `attn1`s.
The `attn2` cross-attentions are never touched.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput
from torch import nn

from . import register_adapter
from .base import AttentionTarget, Layer, ModelAdapter, argument
from .latte import basic_value_only_fn, check_self_attention

#: The UNet's block containers in execution order (a ModuleList of blocks, or a single block).
UNET_STAGES = ("down_blocks", "mid_block", "up_blocks")
LAYER_CLASS = "TransformerSpatioTemporalModel"
HALVES = {"spatial": "transformer_blocks", "temporal": "temporal_transformer_blocks"}


def _is_layer(module: nn.Module) -> bool:
    return any(cls.__name__ == LAYER_CLASS for cls in type(module).__mro__)


@register_adapter
class SVDAdapter(ModelAdapter):
    model_classes = ("UNetSpatioTemporalConditionModel",)
    block_lists = ()
    factorized = True
    # The layers sit between resnets, and the up blocks consume the down blocks' skip connections: the
    # perturbed pass runs in full.
    prefix_reuse = False
    joinable = False

    def layers(self, model: nn.Module) -> List[Layer]:
        out: List[Layer] = []
        for stage in UNET_STAGES:
            container = getattr(model, stage, None)
            if container is None:
                continue
            blocks = list(enumerate(container)) if isinstance(container, nn.ModuleList) else [(None, container)]
            for b, block in blocks:
                block_path = stage if b is None else f"{stage}.{b}"
                # Each block runs its `attentions` in list order (interleaved with its resnets).
                for j, attn in enumerate(getattr(block, "attentions", None) or ()):
                    if _is_layer(attn):
                        out.append(Layer(len(out), (f"{block_path}.attentions.{j}",), (attn,)))
        return out

    def skip_output(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        hidden_states = argument(module, args, kwargs, "hidden_states")
        if not argument(module, args, kwargs, "return_dict"):
            return (hidden_states,)

        return TransformerTemporalModelOutput(sample=hidden_states)

    def attention_targets(self, layer: Layer, mode: str) -> List[AttentionTarget]:
        halves = ("spatial", "temporal") if mode == "attention" else (mode,)
        (layer_path,), (module,) = layer.paths, layer.modules
        targets = []
        for half in halves:
            list_name = HALVES[half]
            for k, block in enumerate(module.get_submodule(list_name)):
                path = f"{layer_path}.{list_name}.{k}.attn1"
                check_self_attention(block.attn1, path)
                targets.append(AttentionTarget(path, block.attn1, None, self.value_only_fn(block.attn1)))
        return targets

    def value_only_fn(self, attn: nn.Module) -> Optional[Callable[..., Any]]:
        return basic_value_only_fn(attn)
