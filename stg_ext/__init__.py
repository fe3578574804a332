"""stg_ext: Spatiotemporal Skip Guidance (STG) for diffusers video pipelines, with fused kernels."""
from .guidance.config import STGConfig, per_step
from .guidance.guider import STGGuidance
from .ops import available_backends, combine, identity_joint_attention
from .guidance.restart import RestartHandle, apply_restart, remove_restart
from .weak.model import STGHandle, perturbed, resolve_layers

__version__ = "0.1.0"

_UNSET = object()


def apply_stg(target, layer, mode="attention", *, scale=1.0, rescale=0.0, start=0.0, stop=1.0,
              orthogonalize=False, strategy="sequential", cfg_scale=_UNSET):
    """Patches `target` in place, removably; returns a handle with `.remove()` (also a context manager).

    - A stock diffusers pipeline: `pipe(...)` then samples with STG (STG_SPEC sections 2 and 4) at the
      pipeline's own CFG scale, read at each call. `mode` may be a tuple of modes (one perturbed pass each,
      factorized guidance) with `scale` a tuple of the same length; `layer`, `scale`, `rescale` may be per
      step (`layer=stg_ext.per_step([...])`, `scale=[...]` of length N); `start`/`stop` bound the window.
    - A denoiser with `cfg_scale=` (a float, a tensor, or None for STG alone): for custom loops; each call on
      `[uncond, cond]` returns `[u, c']` such that your own CFG line yields STG's `f`.
    - A denoiser without `cfg_scale`: installs the weak model (its forward computes the perturbed prediction).

    `strategy="sequential"` (default) computes the perturbed branch from the first perturbed block on, starting
    from the cond pass's activations there (STG_SPEC section 5); `"naive"` runs a full third pass.
    """
    from torch import nn

    from .guidance import apply_to_pipeline, is_pipeline

    guidance = dict(scale=scale, rescale=rescale, start=start, stop=stop, orthogonalize=orthogonalize,
                    strategy=strategy)
    if is_pipeline(target):
        if cfg_scale is not _UNSET:
            raise TypeError("stg_ext.apply_stg: cfg_scale is read from the pipeline at each call; pass it to pipe(...)")
        return apply_to_pipeline(target, STGConfig(layer, mode, **guidance))
    if not isinstance(target, nn.Module):
        raise TypeError(f"stg_ext.apply_stg: {type(target).__name__} is neither a diffusers pipeline nor a denoiser "
                        "module")
    if cfg_scale is _UNSET:
        if guidance != dict(scale=1.0, rescale=0.0, start=0.0, stop=1.0, orthogonalize=False, strategy="sequential"):
            raise TypeError("stg_ext.apply_stg: on a bare denoiser, guidance options (scale, rescale, start, stop, "
                            "orthogonalize) need cfg_scale= (a float, a tensor, or None for STG alone); without it "
                            "apply_stg installs the weak model only")
        from .weak.model import install_perturbation

        remove_stg(target)
        return install_perturbation(target, layer, mode)
    from .guidance.manual import apply_to_denoiser

    remove_stg(target)
    return apply_to_denoiser(target, STGConfig(layer, mode, **guidance), cfg_scale)


def remove_stg(target) -> None:
    """Removes whatever stg_ext installed on a pipeline or a denoiser (no-op when nothing is installed)."""
    from .guidance import is_pipeline, remove_from_pipeline
    from .guidance.session import remove_from_model
    from .weak.model import remove_stg as remove_weak

    if is_pipeline(target):
        remove_from_pipeline(target)
        return
    remove_from_model(target)
    remove_weak(target)


__all__ = ["STGGuidance", "apply_stg", "remove_stg", "perturbed", "resolve_layers", "per_step", "STGConfig", "STGHandle", "combine",
           "identity_joint_attention", "available_backends", "apply_restart", "remove_restart", "RestartHandle",
           "__version__"]
