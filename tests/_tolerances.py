"""Tolerances of every fast path against its reference, per dtype, stated once.

atol is relative to the largest magnitude in play (the tests multiply it by max(1, max|ref|)).
bf16: one ulp (2^-7 relative) — the Triton interpreter truncates fp32->bf16 casts instead of rounding.
fp16: a couple of ulps (2^-10 relative) after one fp32 computation and one rounding.
"""
import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None) -> None:
    dtype = dtype or expected.dtype
    tol = TOLERANCES[dtype]
    scale = max(1.0, expected.float().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"])
