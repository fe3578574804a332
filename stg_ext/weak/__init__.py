"""The weak model (STG_SPEC section 3): one adapter per model family, the hooks that skip a block or make its
self-attention the identity, and the interception of joint attention."""
