"""Benchmarks of fused_sam against classic SAM and the best stock-PyTorch SAM: ``fused-sam bench``."""
