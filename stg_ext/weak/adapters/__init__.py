"""Registry of model-family adapters, keyed by model class (name), most specific class first."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Type

from torch import nn

from .base import AttentionTarget, JointLayout, Layer, ModelAdapter

_REGISTRY: Dict[str, ModelAdapter] = {}


def register_adapter(adapter_cls: Type[ModelAdapter]) -> Type[ModelAdapter]:
    """Class decorator: serve `adapter_cls.model_classes` with one instance of `adapter_cls`.

    To support a new model: subclass ModelAdapter (see stg_ext/weak/adapters/base.py), set `model_classes`,
    `block_lists`, `block_returns`, `self_attention` (and `joint` for joint attention), and decorate it.
    """
    instance = adapter_cls()
    for name in adapter_cls.model_classes:
        _REGISTRY[name] = instance
    return adapter_cls


def supported_models() -> List[str]:
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of `model`'s class (or of its nearest registered base class)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the model
    for cls in type(model).__mro__:
        adapter = _REGISTRY.get(cls.__name__)
        if adapter is not None:
            return adapter
    raise TypeError(
        f"stg_ext: {type(model).__name__} is not a supported denoiser. Supported classes: "
        f"{', '.join(supported_models())}. To add one, subclass stg_ext.weak.adapters.ModelAdapter and decorate it "
        "with @stg_ext.weak.adapters.register_adapter (see stg_ext/weak/adapters/base.py)."
    )


# Family adapters (one module per family in this package) register themselves on import.
def _import_families() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_families()

__all__ = ["AttentionTarget", "JointLayout", "Layer", "ModelAdapter", "get_adapter", "register_adapter",
           "supported_models"]
