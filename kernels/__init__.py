"""fastlm.kernels: the LSTM recurrence, as a plain-PyTorch reference and as a fused Triton kernel.

The folder is `kernels/` at the top of the repository but installs as `fastlm.kernels`, so that it
never shadows Hugging Face's top-level `kernels` package. Both functions share one signature:
`(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh) -> (out, hN, cN)`.
"""
from .naive import naive_lstm

try:
    from .fused_lstm import fused_lstm
except ModuleNotFoundError as err:  # no Triton: the reference still works
    if err.name != "triton":
        raise

    def fused_lstm(*args, **kwargs):
        raise ImportError("fastlm's fused LSTM kernel needs Triton, which is not installed: the CUDA builds of "
                          "torch bring it; elsewhere pip install 'triton>=3.3' (on a CPU it runs interpreted)")

__all__ = ["fused_lstm", "naive_lstm"]
