"""fastlm.kernels: the LSTM recurrence, as a plain-PyTorch reference and as a fused Triton kernel.

The folder is `kernels/` at the top of the repository but installs as `fastlm.kernels`, so that it
never shadows Hugging Face's top-level `kernels` package.
"""
from .naive import naive_lstm

__all__ = ["naive_lstm"]
