"""stg_ext's ops: typed wrappers (argument checks, backend choice), the plain PyTorch references they are tested
against, and the loading of the compiled extension. Importing this package needs torch only (not diffusers)."""
from .backends import BACKENDS, available_backends
from .combination import combine
from .joint_attention import identity_joint_attention
from .reference import cfg_reference, combine_reference, identity_joint_attention_reference

__all__ = ["BACKENDS", "available_backends", "combine", "identity_joint_attention", "cfg_reference",
           "combine_reference", "identity_joint_attention_reference"]
