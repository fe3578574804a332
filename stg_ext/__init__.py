"""stg_ext: Spatiotemporal Skip Guidance (STG) for diffusers video pipelines, with fused kernels."""
from .ops import available_backends, combine

__version__ = "0.1.0"

__all__ = ["combine", "available_backends", "__version__"]
