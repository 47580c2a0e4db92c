"""A fused LSTM layer in Triton: one kernel launch per time step, forward and backward.

Legend of dimension letters
    B   batch rows                     T   time steps
    E   input features                 H   hidden units
    G   gate rows, 4H: the blocks i, f, g, o of nn.LSTM's weights (row gate·H + unit)
    BLOCK_B, BLOCK_N, BLOCK_K   rows, hidden units and reduction chunk of one program

What is fused, and what is left to cuBLAS
    Before the loop, one matmul projects every input step:    XP = x W_ihᵀ + b_ih + b_hh     (B, T, G)
    After the loop, the weight gradients are large matmuls:   dW_hh = Σ_t dG_tᵀ h_{t−1},  dW_ih = dGᵀ x,
                                                              db = Σ dG,  dx = dG W_ih,  dh_0 = dG_0 W_hh
    Only the recurrence runs step by step, in the two kernels below.

Forward step (one launch per t). A program owns BLOCK_N hidden units and *all four gates* of
them, so the four pre-activations of a unit meet in registers and the cell update needs no second
pass:  G_t = XP_t + h_{t−1} W_hhᵀ;  c_t = σ(G_f)·c_{t−1} + σ(G_i)·tanh(G_g);  h_t = σ(G_o)·tanh(c_t).

Backward step (one launch per t, t = T−1 … 0). A program owns BLOCK_N hidden units and computes
    dh_t = ∂L/∂out_t + dG_{t+1} W_hh            (the recurrent product, reduced over all G rows)
and then, as the *epilogue* of that product, the gate gradients dG_t of its own units and the
carried dc_{t−1}. Every program already holds the finished dh_t of exactly the units whose gates it
differentiates, so each saved activation is read once and each dG_t element written once. (In the
product's *prologue* instead, each program would recompute the pointwise part of every G row it
reduces over: the saved activations read H / BLOCK_N times per step, 16× at H = 1024.)

Numerics. Gate math and c are fp32 whatever the input dtype; bf16/fp16 operands go to `tl.dot`
as they are (tensor cores), accumulating in fp32. tanh is written through the sigmoid,
tanh(x) = 2σ(2x) − 1: libdevice's tanh fails under the interpreter and (1−e^{−2x})/(1+e^{−2x})
gives inf/inf = NaN for large |x|. Under TRITON_INTERPRET=1, `tl.dot` on bfloat16 multiplies the
raw bit patterns (triton-lang/triton#11584), so the launchers set DOT_FP32 to upcast bf16 dot
operands to fp32 there; compiled GPU code keeps bf16 on the tensor cores.

Ops. fused_lstm runs the launchers as the torch custom ops fastlm::lstm_forward and
fastlm::lstm_backward (with autograd and fake, shape-only, implementations): a raw Triton launch is
invisible to the dispatcher, so a TorchDispatchMode (the simulated CUDA graph) would not record it
and torch.compile could not trace it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


# -- forward -------------------------------------------------------------------------------------
# Names: `p_*` are pointers (built once per block), `b_*` are blocks loaded or computed in registers.
# Row offsets are int64: rows · stride reaches B·4H, which overflows int32 at large batches.


@triton.jit
def _lstm_fwd_step(
    xp_ptr, stride_xp,  # (B, G) input projection of step t, biases included
    h_prev_ptr, stride_h_prev,  # (B, H) h_{t−1}, in the compute dtype
    c_prev_ptr, stride_c_prev,  # (B, H) c_{t−1}, fp32
    w_hh_ptr,  # (G, H) W_hh, contiguous
    h_ptr, stride_h,  # (B, H) out: h_t (a view of out[:, t])
    c_ptr, stride_c,  # (B, H) out: c_t, fp32
    act_ptr, stride_act,  # (B, G) out: i, f, g, o after their nonlinearity, fp32, for backward
    B, H,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    unit_ok = units < H
    ok = row_ok[:, None] & unit_ok[None, :]

    # G_t[:, gate·H + units] = h_{t−1} W_hh[gate·H + units, :]ᵀ for the four gates at once.
    b_acc_i = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    b_acc_f = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    b_acc_g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    b_acc_o = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    gate_stride = H * H  # rows gate·H … gate·H + H − 1 of W_hh
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        p_h = h_prev_ptr + rows[:, None] * stride_h_prev + ks[None, :]
        p_w = w_hh_ptr + units[None, :] * H + ks[:, None]  # our units' W_hh rows, as a (BLOCK_K, BLOCK_N) tile
        w_ok = k_ok[:, None] & unit_ok[None, :]
        b_h = tl.load(p_h, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_w_i = tl.load(p_w, mask=w_ok, other=0.0)
        b_w_f = tl.load(p_w + gate_stride, mask=w_ok, other=0.0)
        b_w_g = tl.load(p_w + 2 * gate_stride, mask=w_ok, other=0.0)
        b_w_o = tl.load(p_w + 3 * gate_stride, mask=w_ok, other=0.0)
        if DOT_FP32:
            b_h = b_h.to(tl.float32)
            b_w_i, b_w_f = b_w_i.to(tl.float32), b_w_f.to(tl.float32)
            b_w_g, b_w_o = b_w_g.to(tl.float32), b_w_o.to(tl.float32)
        b_acc_i = tl.dot(b_h, b_w_i, b_acc_i, input_precision=INPUT_PRECISION)
        b_acc_f = tl.dot(b_h, b_w_f, b_acc_f, input_precision=INPUT_PRECISION)
        b_acc_g = tl.dot(b_h, b_w_g, b_acc_g, input_precision=INPUT_PRECISION)
        b_acc_o = tl.dot(b_h, b_w_o, b_acc_o, input_precision=INPUT_PRECISION)

    p_xp = xp_ptr + rows[:, None] * stride_xp + units[None, :]
    p_c_prev = c_prev_ptr + rows[:, None] * stride_c_prev + units[None, :]
    p_h = h_ptr + rows[:, None] * stride_h + units[None, :]
    p_c = c_ptr + rows[:, None] * stride_c + units[None, :]
    p_act = act_ptr + rows[:, None] * stride_act + units[None, :]

    b_i = _sigmoid(b_acc_i + tl.load(p_xp, mask=ok, other=0.0).to(tl.float32))
    b_f = _sigmoid(b_acc_f + tl.load(p_xp + H, mask=ok, other=0.0).to(tl.float32))
    b_g = _tanh(b_acc_g + tl.load(p_xp + 2 * H, mask=ok, other=0.0).to(tl.float32))
    b_o = _sigmoid(b_acc_o + tl.load(p_xp + 3 * H, mask=ok, other=0.0).to(tl.float32))
    b_c = b_f * tl.load(p_c_prev, mask=ok, other=0.0) + b_i * b_g
    b_h = b_o * _tanh(b_c)

    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=ok)
    tl.store(p_c, b_c, mask=ok)
    tl.store(p_act, b_i, mask=ok)
    tl.store(p_act + H, b_f, mask=ok)
    tl.store(p_act + 2 * H, b_g, mask=ok)
    tl.store(p_act + 3 * H, b_o, mask=ok)


# -- backward ------------------------------------------------------------------------------------


@triton.jit
def _lstm_bwd_step(
    dg_next_ptr, stride_dg_next,  # (B, G) dG_{t+1}; unused when HAS_NEXT is False (t = T − 1)
    w_hh_ptr,  # (G, H) W_hh, contiguous
    dout_ptr, stride_dout,  # (B, H) ∂L/∂out_t (∂L/∂h_N already added at t = T − 1)
    dc_ptr, stride_dc,  # (B, H) fp32, in: ∂L/∂c_t from later steps; out: ∂L/∂c_{t−1}
    act_ptr, stride_act,  # (B, G) fp32 i, f, g, o of step t
    c_ptr, stride_c,  # (B, H) fp32 c_t
    c_prev_ptr, stride_c_prev,  # (B, H) fp32 c_{t−1}
    dg_ptr, stride_dg,  # (B, G) out: dG_t, in the compute dtype
    B, H,
    HAS_NEXT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    unit_ok = units < H
    ok = row_ok[:, None] & unit_ok[None, :]

    # dh_t = ∂L/∂out_t + Σ_k dG_{t+1}[:, k] · W_hh[k, units]   (k over all 4H gate rows)
    b_dh = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if HAS_NEXT:
        for k0 in range(0, 4 * H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < 4 * H
            p_dg_next = dg_next_ptr + rows[:, None] * stride_dg_next + ks[None, :]
            p_w = w_hh_ptr + ks[:, None] * H + units[None, :]
            b_dg_next = tl.load(p_dg_next, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_w = tl.load(p_w, mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
            if DOT_FP32:
                b_dg_next, b_w = b_dg_next.to(tl.float32), b_w.to(tl.float32)
            b_dh = tl.dot(b_dg_next, b_w, b_dh, input_precision=INPUT_PRECISION)

    p_dout = dout_ptr + rows[:, None] * stride_dout + units[None, :]
    p_act = act_ptr + rows[:, None] * stride_act + units[None, :]
    p_c = c_ptr + rows[:, None] * stride_c + units[None, :]
    p_c_prev = c_prev_ptr + rows[:, None] * stride_c_prev + units[None, :]
    p_dc = dc_ptr + rows[:, None] * stride_dc + units[None, :]
    p_dg = dg_ptr + rows[:, None] * stride_dg + units[None, :]

    b_dh += tl.load(p_dout, mask=ok, other=0.0).to(tl.float32)
    b_i = tl.load(p_act, mask=ok, other=0.0)
    b_f = tl.load(p_act + H, mask=ok, other=0.0)
    b_g = tl.load(p_act + 2 * H, mask=ok, other=0.0)
    b_o = tl.load(p_act + 3 * H, mask=ok, other=0.0)
    b_c_prev = tl.load(p_c_prev, mask=ok, other=0.0)
    b_dc = tl.load(p_dc, mask=ok, other=0.0)

    b_tanh_c = _tanh(tl.load(p_c, mask=ok, other=0.0))
    # h_t = o ⊙ tanh(c_t):   ∂L/∂G_o = dh ⊙ tanh(c_t) ⊙ o(1 − o)
    b_dg_o = b_dh * b_tanh_c * b_o * (1.0 - b_o)
    # ∂L/∂c_t = (carried from c_{t+1}) + dh ⊙ o ⊙ (1 − tanh²(c_t))
    b_dc += b_dh * b_o * (1.0 - b_tanh_c * b_tanh_c)
    # c_t = f ⊙ c_{t−1} + i ⊙ g:   ∂L/∂G_i = dc ⊙ g ⊙ i(1 − i)
    b_dg_i = b_dc * b_g * b_i * (1.0 - b_i)
    # ∂L/∂G_f = dc ⊙ c_{t−1} ⊙ f(1 − f)
    b_dg_f = b_dc * b_c_prev * b_f * (1.0 - b_f)
    # ∂L/∂G_g = dc ⊙ i ⊙ (1 − g²)
    b_dg_g = b_dc * b_i * (1.0 - b_g * b_g)
    # ∂L/∂c_{t−1} = dc ⊙ f   (each (row, unit) is read and written by this program only: in place is safe)
    b_dc_prev = b_dc * b_f

    out_ty = dg_ptr.dtype.element_ty
    tl.store(p_dg, b_dg_i.to(out_ty), mask=ok)
    tl.store(p_dg + H, b_dg_f.to(out_ty), mask=ok)
    tl.store(p_dg + 2 * H, b_dg_g.to(out_ty), mask=ok)
    tl.store(p_dg + 3 * H, b_dg_o.to(out_ty), mask=ok)
    tl.store(p_dc, b_dc_prev, mask=ok)


# -- host launchers ------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class StepConfig:
    block_b: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The fastest block configuration per GPU model and shape, measured by `python -m benchmarks.tune_step`
# (benchmarks/gpu_check.sh runs it). Anything it does not list uses `rule_step_config`: a winner on
# one GPU may not even launch on another (its shared memory), so entries apply to their GPU only.
TUNED_CONFIGS = Path(__file__).with_name("step_configs.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tuned_key(kernel: str, batch: int, hidden: int, dtype: torch.dtype) -> str:
    return f"{kernel} {DTYPE_NAMES[dtype]} B{batch} H{hidden}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=1)
def tuned_configs() -> dict[tuple[str, str], StepConfig]:
    """(GPU name, tuned_key) → the measured winner."""
    if not TUNED_CONFIGS.is_file():
        return {}
    rows = json.loads(TUNED_CONFIGS.read_text())["configs"]
    return {(row["gpu"], row["key"]): StepConfig(**row["config"]) for row in rows}


def step_config(batch: int, hidden: int, dtype: torch.dtype, kernel: str = "fwd",
                device: torch.device | None = None) -> StepConfig:
    """The block sizes of a step kernel (`fwd` or `bwd`) on `device`: the one place they are chosen,
    the measured winner from TUNED_CONFIGS for this GPU and shape where it lists one, else the rule."""
    tuned = tuned_configs().get((device_name(device), tuned_key(kernel, batch, hidden, dtype))) if device else None
    return tuned or rule_step_config(batch, hidden, dtype)


def rule_step_config(batch: int, hidden: int, dtype: torch.dtype) -> StepConfig:
    """The choice before any measurement: tl.dot needs every tile side ≥ 16, and few hidden units per
    program (16 up to H = 1024) give the most programs, since the step is bound by streaming W_hh
    from L2 into as many SMs as possible."""
    block_b = 16 if batch <= 16 else 32 if batch <= 32 else 64
    block_n = 16 if hidden <= 1024 else 32
    block_k = 32 if dtype == torch.float32 else 64
    return StepConfig(block_b, block_n, block_k, num_warps=4, num_stages=3)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel_flags(dtype: torch.dtype) -> dict:
    return {
        "DOT_FP32": interpreting() and dtype == torch.bfloat16,
        # fp32 operands: IEEE products, so float32 matches nn.LSTM to ~1e-6 (tf32 would give ~1e-3).
        "INPUT_PRECISION": "ieee",
    }


def _grid(cfg: StepConfig, batch: int, hidden: int) -> tuple[int, int]:
    return (triton.cdiv(hidden, cfg.block_n), triton.cdiv(batch, cfg.block_b))


def launch_device(device: torch.device):
    """Where the step kernels launch: Triton launches on torch's *current* CUDA device and stream,
    so make that the inputs' device (with cuda:1 tensors and device 0 current, the kernels would
    run on GPU 0 with GPU 1's pointers)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def lstm_forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, cfg: StepConfig | None = None):
    """Forward of one layer. Returns out (B, T, H), c (T, B, H) fp32, act (T, B, G) fp32.
    `cfg` overrides `step_config` (the tuning sweep times each candidate through it)."""
    B, T, _ = x.shape
    H = h0.shape[1]
    cfg = cfg or step_config(B, H, x.dtype, "fwd", x.device)
    x_proj = torch.addmm((bias_ih + bias_hh), x.reshape(B * T, -1), weight_ih.t()).view(B, T, 4 * H)
    out = torch.empty(B, T, H, device=x.device, dtype=x.dtype)
    c = torch.empty(T, B, H, device=x.device, dtype=torch.float32)
    act = torch.empty(T, B, 4 * H, device=x.device, dtype=torch.float32)
    h0, c0 = h0.contiguous(), c0.float().contiguous()
    w_hh = weight_hh.contiguous()
    grid = _grid(cfg, B, H)
    with launch_device(x.device):
        for t in range(T):
            h_prev = out[:, t - 1] if t > 0 else h0
            c_prev = c[t - 1] if t > 0 else c0
            _lstm_fwd_step[grid](
                x_proj[:, t], x_proj.stride(0), h_prev, h_prev.stride(0), c_prev, c_prev.stride(0), w_hh,
                out[:, t], out.stride(0), c[t], c.stride(1), act[t], act.stride(1), B, H,
                BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **_kernel_flags(x.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    return out, c, act


def lstm_backward(d_out, d_hn, d_cn, x, h0, c0, weight_ih, weight_hh, out, c, act, cfg: StepConfig | None = None):
    """Backward of one layer: the T step kernels in reverse, then the weight-gradient matmuls.
    d_out, d_hn, d_cn may be None (that output took no part in the loss). Returns d_x, d_h0,
    d_c0 (in c0's dtype), d_weight_ih, d_weight_hh and d_bias (the gradient of either bias)."""
    B, T, _ = x.shape
    H = h0.shape[1]
    dtype = x.dtype
    cfg = cfg or step_config(B, H, dtype, "bwd", x.device)
    d_gates = torch.empty(B, T, 4 * H, device=x.device, dtype=dtype)  # dG, rows (b, t) for the matmuls
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    dc = torch.zeros(B, H, device=x.device, dtype=torch.float32) if d_cn is None else d_cn.float().clone().contiguous()
    c0_dtype, c0 = c0.dtype, c0.float().contiguous()
    w_hh = weight_hh.contiguous()
    grid = _grid(cfg, B, H)
    with launch_device(x.device):
        for t in reversed(range(T)):
            last = t == T - 1
            d_out_t = (d_out[:, t] + d_hn).contiguous() if last and d_hn is not None else d_out[:, t]
            c_prev = c[t - 1] if t > 0 else c0
            dg_next = d_gates[:, t if last else t + 1]  # not read when t = T − 1
            _lstm_bwd_step[grid](
                dg_next, d_gates.stride(0), w_hh, d_out_t, d_out_t.stride(0), dc, dc.stride(0),
                act[t], act.stride(1), c[t], c.stride(1), c_prev, c_prev.stride(0),
                d_gates[:, t], d_gates.stride(0), B, H,
                HAS_NEXT=not last, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                **_kernel_flags(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    d_flat = d_gates.view(B * T, 4 * H)
    h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], dim=1).reshape(B * T, H)
    d_x = (d_flat @ weight_ih).view(B, T, -1)
    d_h0 = d_gates[:, 0] @ weight_hh
    d_weight_ih = d_flat.t() @ x.reshape(B * T, -1)
    d_weight_hh = d_flat.t() @ h_prev
    d_bias = d_flat.sum(0, dtype=torch.float32).to(dtype)
    return d_x, d_h0, dc.to(c0_dtype), d_weight_ih, d_weight_hh, d_bias


# -- custom ops ----------------------------------------------------------------------------------
# An op cannot take a StepConfig, so `config` is its fields as a list (block_b, block_n, block_k,
# num_warps, num_stages), None for step_config's choice: the tuning sweep times candidates through
# the ops, so that a simulated CUDA graph records them. Fake implementations must match the real
# outputs' shapes, dtypes and (contiguous) strides.


def _step_config(config: list[int] | None) -> StepConfig | None:
    return None if config is None else StepConfig(*config)


@torch.library.custom_op("fastlm::lstm_forward", mutates_args=())
def lstm_forward_op(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                    bias_hh: Tensor, config: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fused_lstm's out, hN, cN, then c and act for the backward (not differentiable)."""
    out, c, act = lstm_forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, _step_config(config))
    return out, out[:, -1].clone(), c[-1].clone(), c, act  # an op's outputs may not alias one another


@lstm_forward_op.register_fake
def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, config=None):
    B, T, _ = x.shape
    H = h0.shape[1]
    fp32 = torch.float32
    return (x.new_empty(B, T, H), x.new_empty(B, H), x.new_empty(B, H, dtype=fp32),
            x.new_empty(T, B, H, dtype=fp32), x.new_empty(T, B, 4 * H, dtype=fp32))


@torch.library.custom_op("fastlm::lstm_backward", mutates_args=())
def lstm_backward_op(d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None, x: Tensor, h0: Tensor,
                     c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, out: Tensor, c: Tensor,
                     act: Tensor, config: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`lstm_backward`: d_x, d_h0, d_c0 (in c0's dtype), d_weight_ih, d_weight_hh, d_bias."""
    return lstm_backward(d_out, d_hn, d_cn, x, h0, c0, weight_ih, weight_hh, out, c, act, _step_config(config))


@lstm_backward_op.register_fake
def _(d_out, d_hn, d_cn, x, h0, c0, weight_ih, weight_hh, out, c, act, config=None):
    return (x.new_empty(x.shape), x.new_empty(h0.shape), c0.new_empty(c0.shape), x.new_empty(weight_ih.shape),
            x.new_empty(weight_hh.shape), x.new_empty(weight_hh.shape[0]))


def _save_for_backward(ctx, inputs, output):
    x, h0, c0, weight_ih, weight_hh, _, _, _ = inputs
    out, _, _, c, act = output
    ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, out, c, act)
    ctx.mark_non_differentiable(c, act)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to allocate and read


def _backward(ctx, d_out, d_hn, d_cn, _d_c, _d_act):
    d_x, d_h0, d_c0, d_weight_ih, d_weight_hh, d_bias = lstm_backward_op(d_out, d_hn, d_cn, *ctx.saved_tensors)
    return d_x, d_h0, d_c0, d_weight_ih, d_weight_hh, d_bias, d_bias, None


lstm_forward_op.register_autograd(_backward, setup_context=_save_for_backward)


# -- public function -----------------------------------------------------------------------------


def _check_inputs(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh) -> None:
    named = {"x": x, "h0": h0, "c0": c0, "weight_ih": weight_ih, "weight_hh": weight_hh,
             "bias_ih": bias_ih, "bias_hh": bias_hh}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"fused_lstm: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"fused_lstm: x must be 3-D (B, T, E), got shape {tuple(x.shape)}")
    B, T, E = x.shape
    if B < 1 or T < 1:
        raise ValueError(f"fused_lstm: x needs at least one row and one time step, got shape {tuple(x.shape)}")
    if weight_hh.dim() != 2 or weight_hh.shape[0] != 4 * weight_hh.shape[1]:
        raise ValueError(f"fused_lstm: weight_hh must be (4H, H), got shape {tuple(weight_hh.shape)}")
    H = weight_hh.shape[1]
    expected = {"h0": (B, H), "c0": (B, H), "weight_ih": (4 * H, E), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"fused_lstm: {name} must have shape {shape}, got {tuple(named[name].shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_lstm: dtype {x.dtype} is not supported: use float32, bfloat16 or float16")
    for name, t in named.items():
        if t.dtype != x.dtype and not (name == "c0" and t.dtype == torch.float32):
            raise ValueError(f"fused_lstm: {name} is {t.dtype} but x is {x.dtype}: pass every input in one dtype "
                             "(c0 may also be float32)")
        if t.device != x.device:
            raise ValueError(f"fused_lstm: {name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"fused_lstm: inputs are on {x.device}; the Triton kernel runs on CUDA tensors "
            "(or on the CPU with TRITON_INTERPRET=1 set before import)"
        )


def fused_lstm(
    x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, batch-first, computed by the fused Triton step kernels (through the op
    fastlm::lstm_forward); differentiable.

    Args:
        x: (B, T, E) inputs.
        h0, c0: (B, H) initial state.
        weight_ih: (4H, E), weight_hh: (4H, H), bias_ih, bias_hh: (4H,), nn.LSTM's layout, gates i, f, g, o.
        All in one dtype (float32, bfloat16 or float16) on one CUDA device (or the CPU when interpreting),
        except c0, which may also be float32 (the kernel's own precision for c).

    Returns:
        out (B, T, H), hN (B, H): h_t of every step and the last one, in x's dtype;
        cN (B, H): the final cell state, always float32, so that carrying it to the next window
        loses nothing (pass it back as c0).
    """
    _check_inputs(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    out, h_n, c_n, _, _ = lstm_forward_op(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    return out, h_n, c_n
