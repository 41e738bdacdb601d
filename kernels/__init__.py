"""Triton kernels, one folder per op, each mirroring flash-linear-attention (naive / fused_recurrent / chunk)."""
