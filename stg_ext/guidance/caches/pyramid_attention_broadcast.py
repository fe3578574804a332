"""Pyramid Attention Broadcast: attention modules return their output of an earlier call on some calls.

Its state (the broadcast output and an iteration count per attention module) is not kept per cache context: every
call that passes through the hook counts and may be served the stored output. STG's perturbed passes therefore
bypass it (they would be served the stock pass's attention, of another batch size, and shift the schedule)."""
from .base import CacheKind

KIND = CacheKind(
    name="Pyramid Attention Broadcast",
    config="PyramidAttentionBroadcastConfig",
    hooks=("pyramid_attention_broadcast",),
    definition="u and c as PAB computes them without STG (its broadcast schedule counts the stock calls only); "
               "p by the uncached weak model, every block computed (PAB bypassed in the perturbed pass)",
)
