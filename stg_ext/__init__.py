"""stg_ext: Spatiotemporal Skip Guidance (STG) for diffusers video pipelines, with fused kernels.

The ops (`combine`, `identity_joint_attention`, `available_backends`) need torch only; everything else needs
diffusers and is imported on first use, so `import stg_ext; stg_ext.combine(...)` does not import diffusers.
"""
from importlib import import_module

from .ops import available_backends, combine, identity_joint_attention

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "apply_stg": "stg_ext.api",
    "remove_stg": "stg_ext.api",
    "weak_model": "stg_ext.api",
    "perturbed": "stg_ext.api",
    "STGConfig": "stg_ext.guidance.config",
    "per_step": "stg_ext.guidance.config",
    "STGGuidance": "stg_ext.guidance.guider",
    "apply_restart": "stg_ext.guidance.restart",
    "remove_restart": "stg_ext.guidance.restart",
    "RestartHandle": "stg_ext.guidance.restart",
    "WeakModelHandle": "stg_ext.weak.model",
    "resolve_layers": "stg_ext.weak.model",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stg_ext' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["apply_stg", "remove_stg", "weak_model", "perturbed", "resolve_layers", "per_step", "STGConfig",
           "STGGuidance", "WeakModelHandle", "combine", "identity_joint_attention", "available_backends",
           "apply_restart", "remove_restart", "RestartHandle", "__version__"]
