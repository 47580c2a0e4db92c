"""fastlm.kernels: the LSTM recurrence, as a plain-PyTorch reference and as a fused Triton kernel.

The folder is `kernels/` at the top of the repository but installs as `fastlm.kernels`, so that it
never shadows Hugging Face's top-level `kernels` package. Both functions share one signature:
`(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh) -> (out, hN, cN)`.
"""
from .fused_lstm import fused_lstm
from .naive import naive_lstm

__all__ = ["fused_lstm", "naive_lstm"]
