"""stg_ext: Spatiotemporal Skip Guidance (STG) for diffusers video pipelines, with fused kernels."""
from .ops import available_backends, combine, identity_joint_attention
from .weak import STGHandle, perturbed, remove_stg, resolve_layers

__version__ = "0.1.0"


def apply_stg(target, layer, mode: str = "attention", **kwargs) -> STGHandle:
    """Patches `target` in place, removably (STG_SPEC section 3).

    On a denoiser model: installs the weak model (its forward computes the perturbed prediction) until
    `handle.remove()` / `remove_stg(model)`; the handle is also a context manager.
    """
    from torch import nn

    from .weak import install_perturbation

    if not isinstance(target, nn.Module):
        raise TypeError(
            f"stg_ext.apply_stg: {type(target).__name__} is not a denoiser module. Pipeline-level STG (guided "
            "sampling on a stock pipeline) is not available yet; apply it to the pipeline's transformer/unet, "
            "or use stg_ext.perturbed(pipe.transformer, layer, mode)."
        )
    if kwargs:
        raise TypeError(f"stg_ext.apply_stg: unexpected options {sorted(kwargs)} for a denoiser model")
    return install_perturbation(target, layer, mode)


__all__ = ["apply_stg", "remove_stg", "perturbed", "resolve_layers", "STGHandle", "combine",
           "identity_joint_attention", "available_backends", "__version__"]
