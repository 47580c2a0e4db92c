"""Compile every configuration of the fused LSTM step kernels for Hopper (sm_90), without a GPU.

    python -m benchmarks.compile_check [--out FILE.json]

For float32, bfloat16 and float16, H ∈ {256, 1024, 2048} and batch sizes that reach every row block
the launchers choose (and every candidate the GPU sweep `benchmarks.tune_step` may time), it builds both step kernels with `triton.compile` for GPUTarget("cuda", 90, 32)
and reads the cubin with the cuobjdump shipped in the triton wheel. It asserts: the kernel compiles;
no register spills (LOCAL:0 in `cuobjdump -res-usage`, no LDL/STL in the SASS); for bf16/fp16 the
recurrent product runs on tensor cores (HMMA or HGMMA in the SASS). It prints, per configuration,
registers, shared memory (static, and the dynamic part Triton asks for at launch: its pipeline
buffers) and the cp.async copies (LDGSTS) that show the K loop was software-pipelined. Run with
TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import astuple
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

# Named imports: `fastlm.kernels.fused_lstm` as an attribute is the function, not the module.
from benchmarks import tune_step
from fastlm.kernels.fused_lstm import (
    DTYPE_NAMES,
    StepConfig,
    _lstm_bwd_step,
    _lstm_fwd_step,
    interpreting,
    rule_step_config,
    tuned_configs,
)

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
HIDDEN = (256, 1024, 2048)
BATCHES = (1, 20, 64, 256)  # reach every BLOCK_B that step_config picks
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _signature(kernel, dtype: str, ints_divisible: set[str], constexprs: dict):
    """Argument types as a launch with these tensors would give them, and Triton's 16-divisibility hints."""
    fp32_pointers = {"c_prev_ptr", "c_ptr", "act_ptr", "dc_ptr"}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_pointers else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ints_divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    numbers = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "registers": int(numbers["REG"]),
        "stack": int(numbers["STACK"]),
        "shared": int(numbers["SHARED"]),
        "local": int(numbers["LOCAL"]),
        "spill_instructions": len(re.findall(r"\b(LDL|STL)\b", sass)),
        "tensor_core_instructions": len(re.findall(r"\b(HMMA|HGMMA)\b", sass)),
        # cp.async copies: Triton pipelined the K loop (num_stages), loads overlap the products
        "async_copy_instructions": len(re.findall(r"\bLDGSTS\b", sass)),
    }


def configurations() -> list[tuple[str, torch.dtype, int, StepConfig]]:
    """(kernel, dtype, H, config): every configuration the rule picks, every candidate the GPU sweep
    (benchmarks/tune_step.py) may time and every winner it recorded, so that all are proven."""
    chosen = {(kernel, dtype, H, rule_step_config(B, H, dtype))
              for kernel in tune_step.KERNELS for dtype in DTYPES for H in HIDDEN for B in BATCHES}
    swept = {(kernel, tune_step.DTYPE, H, cfg)
             for B, H in tune_step.SHAPES for kernel in tune_step.KERNELS for cfg in tune_step.candidates(B, H)}
    recorded = set()
    for (_, key), cfg in tuned_configs().items():
        kernel, dtype, _, hidden = key.split()
        dtype = next(d for d, name in DTYPE_NAMES.items() if name == dtype)
        recorded.add((kernel, dtype, int(hidden.removeprefix("H")), cfg))
    return sorted(chosen | swept | recorded, key=lambda c: (c[0], str(c[1]), c[2], astuple(c[3])))


def check_all() -> list[dict]:
    rows = []
    for kind, dtype, H, cfg in configurations():
        blocks = {"BLOCK_B": cfg.block_b, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                  "DOT_FP32": False, "INPUT_PRECISION": "ieee"}
        if kind == "fwd":
            variants = [("fwd", _lstm_fwd_step, blocks)]
        else:
            variants = [(f"bwd{'' if has_next else '-last'}", _lstm_bwd_step, {**blocks, "HAS_NEXT": has_next})
                        for has_next in (True, False)]
        for name, kernel, constexprs in variants:
            divisible = {n for n in kernel.arg_names if n.startswith("stride")} | {"H"}
            signature, attrs = _signature(kernel, DTYPES[dtype], divisible, constexprs)
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=TARGET,
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            row = {"kernel": name, "dtype": DTYPES[dtype], "H": H, "BLOCK_B": cfg.block_b, "BLOCK_N": cfg.block_n,
                   "BLOCK_K": cfg.block_k, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                   **_resources(compiled.asm["cubin"]),
                   # cuobjdump's SHARED is the static part only; Triton asks for its pipeline
                   # buffers as dynamic shared memory at launch
                   "dynamic_shared": compiled.metadata.shared}
            problems = []
            if row["local"] or row["spill_instructions"]:
                problems.append("register spills")
            has_product = name != "bwd-last"
            if dtype != torch.float32 and has_product and not row["tensor_core_instructions"]:
                problems.append("no tensor-core instructions")
            row["problems"] = problems
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the report as JSON here (default: print only; the recorded one is "
                   "benchmarks/results/compile_check.json)")
    args = p.parse_args(argv)
    if interpreting():
        print("error: TRITON_INTERPRET is set; unset it to compile the kernels", file=sys.stderr)
        return 2
    rows = check_all()
    print(f"{'kernel':9} {'dtype':5} {'H':>5} {'BLOCK B/N/K':>12} {'regs':>5} {'static smem':>11} {'dyn smem':>8} {'local':>5} "
          f"{'TC ops':>6} {'cp.async':>8}  result")
    for r in rows:
        blocks = f"{r['BLOCK_B']}/{r['BLOCK_N']}/{r['BLOCK_K']}"
        print(f"{r['kernel']:9} {r['dtype']:5} {r['H']:>5} {blocks:>12} {r['registers']:>5} {r['shared']:>11} {r['dynamic_shared']:>8} "
              f"{r['local']:>5} {r['tensor_core_instructions']:>6} {r['async_copy_instructions']:>8}  "
              f"{', '.join(r['problems']) or 'ok'}")
    report = {"target": "cuda sm_90 (GPUTarget('cuda', 90, 32))", "triton": triton.__version__,
              "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
              "configs": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    failed = [r for r in rows if r["problems"]]
    if failed:
        print(f"{len(failed)} of {len(rows)} configurations failed")
        return 1
    print(f"all configurations passed ({len(rows)} compiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
