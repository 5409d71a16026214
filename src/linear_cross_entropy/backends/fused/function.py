"""Placeholder, replaced below."""
def linear_cross_entropy_fused(*a, **k):
    raise NotImplementedError
