"""Pipeline-level STG: drop-in guidance on stock diffusers pipelines (see session.py)."""
from .session import GuidanceSession, apply_to_pipeline, is_pipeline, remove_from_pipeline
from .specs import PipelineSpec, register_pipeline, supported_pipelines

__all__ = ["GuidanceSession", "PipelineSpec", "apply_to_pipeline", "is_pipeline", "register_pipeline",
           "remove_from_pipeline", "supported_pipelines"]
