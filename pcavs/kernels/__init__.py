"""Hand-written GPU kernels (Triton), each optional: callers ask `available(...)` and keep their eager
PyTorch path for everything else (CPU, no triton, autograd)."""
