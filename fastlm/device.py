"""The machine a run uses: which device, which autocast dtype, what the CPU can multiply fast, how
much memory is free, the random generators' state, and a CPU allocator setting."""
from __future__ import annotations

import ctypes
import os
import platform

import torch

from fastlm.errors import TrainingError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = 2**63 - 1  # torch's generators take a 64-bit seed: a larger Python int overflows with a traceback
SIMULATE_ENV = "FASTLM_SIMULATE_CUDA_GRAPHS"  # a test switch: CPU runs take the CUDA-graph path, simulated


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise TrainingError(f"--seed must be between 0 and 2**63 - 1, got {seed}")


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when a GPU is visible), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"fastlm runs on cpu or cuda, not {device.type}: use cpu, cuda, cuda:N or auto")
    if device.type == "cpu" and device.index not in (None, 0):
        raise TrainingError(f"--device {name}: there is one CPU device, and torch spreads its work over every core: "
                            "use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def use_device(device: torch.device) -> None:
    """Make a CUDA device the current one: streams, graph captures and Triton launches all go to the
    current device, whatever device the tensors are on."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def cuda_graphs_available(device: torch.device) -> bool:
    """CUDA graphs on a CUDA device; on the CPU only under the test switch, which simulates them
    (`fastlm.training.graphs.graph_api` picks the mechanism)."""
    return device.type == "cuda" or os.environ.get(SIMULATE_ENV, "0") not in ("", "0")


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: `auto` is bf16 on a GPU that supports it, else off.

    Off on every CPU, so a CPU run reproduces float32 math by default; on CPUs with bf16 units (see
    `cpu_bf16_unit`) the trainer points at `--amp bf16`."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP_DTYPES[amp]


def autocast(device_type: str, amp_dtype: torch.dtype | None):
    """Autocast to `amp_dtype`, or a context that changes nothing when it is None.

    The cast cache is off, as torch.cuda.graphs asks of autocast inside a capture; the step casts
    each weight once anyway.
    """
    return torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None,
                          cache_enabled=False)


# -- what the CPU can multiply ---------------------------------------------------------------------

# Without these units a 16-bit float matmul is emulated, many times slower than fp32
# (benchmarks/README.md has the figures).
CPU_UNITS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def _cpu_capabilities() -> dict:
    return getattr(torch.cpu, "get_capabilities", lambda: {})()


def cpu_bf16_unit() -> str | None:
    """This CPU's bfloat16 units (AMX tiles, else AVX512-BF16's dot products), on which oneDNN's
    bf16 matmuls outrun float32's; None without them."""
    return next((unit.upper() for unit in CPU_UNITS[torch.bfloat16] if _cpu_capabilities().get(unit)), None)


def check_cpu_can_multiply(amp_dtype: torch.dtype | None) -> None:
    """Refuse --amp bf16/fp16 on a CPU that has no units for that dtype, before any work."""
    units = CPU_UNITS.get(amp_dtype, ())
    if units and not any(_cpu_capabilities().get(unit) for unit in units):
        name = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
        raise TrainingError(f"this CPU has no {name} units ({' or '.join(u.upper() for u in units)}), so --amp {name} "
                            "would run many times slower than fp32 here: use --amp off")


# -- memory ----------------------------------------------------------------------------------------

def available_bytes(device: torch.device) -> int | None:
    """Memory free for tensors on `device` now (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(needed: int, device: torch.device) -> None:
    """Refuse a model that needs more than the free memory (`needed` bytes: `training_bytes`), before
    allocating anything (else the allocation fails with a traceback, or swaps for minutes)."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise TrainingError(f"training this model needs at least {needed / 2**30:.1f} GiB (weights, gradients, "
                            f"optimizer state and one window's activations) and {device} has {free / 2**30:.1f} GiB "
                            "free: use a smaller --hidden-size, --embed-size, --num-layers, --batch-size or --seq-len")


def prepare(device: torch.device, amp: str, needed: int, say) -> torch.dtype | None:
    """This run's autocast dtype on `device`, after refusing what the machine cannot do (a model that
    needs more than its free memory, 16-bit floats on a CPU without units for them) and, on the CPU,
    keeping freed memory (no page faults on freshly mapped tensors every step)."""
    amp_dtype = amp_dtype_for(amp, device)
    check_fits(needed, device)
    if device.type == "cpu":
        check_cpu_can_multiply(amp_dtype)
        retain_freed_memory()
        if amp == "auto" and (unit := cpu_bf16_unit()):
            say(f"this CPU has bf16 units ({unit}): --amp bf16 trains 1.3-1.5x faster per step, within one perplexity "
                "of fp32 after an epoch (measured: benchmarks/README.md)")
    return amp_dtype


# glibc's mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: return memory only when 2 GiB lie free at the top
_retained = False


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (process-wide); False where not glibc.

    A CPU step allocates and frees blocks large enough that malloc serves them with fresh `mmap`
    pages and returns them on `free`, so every step would page-fault on brand-new memory. With mmap
    off and trimming out of reach the next step reuses the freed blocks; the process keeps its peak
    footprint until it exits, as a training run does anyway (figures in benchmarks/README.md).
    """
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _retained = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM) == 1  # 1: success
    return _retained


def is_retaining_freed_memory() -> bool:
    """Whether `retain_freed_memory` has taken effect in this process."""
    return _retained


# -- random generators -----------------------------------------------------------------------------


def rng_state() -> dict:
    """The state of every generator a step draws from (dropout masks, sampled words): the CPU's and
    the current CUDA device's; `set_rng_state` puts it back, in a checkpoint or around a trial step.

    The current device's alone: under torchrun each rank draws on its own GPU, so every rank takes
    rank 0's saved state onto its device, and the ranks stay in step after a resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # checkpoints before 2026-12-06 hold every device's, by index
            current = torch.cuda.current_device()
            if current >= len(cuda):
                return
            cuda = cuda[current]
        torch.cuda.set_rng_state(cuda)
