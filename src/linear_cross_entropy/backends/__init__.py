"""Backends: ``reference`` (materialises the logits), ``chunked`` (pure PyTorch), ``fused`` (Triton + cuBLAS)."""
