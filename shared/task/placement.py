"""Where a task model's forward passes run: the device and dtype, resolved and checked before anything is written.

Models load in float32 on the CPU, where the base digest and the data-free pruning are computed (the same on
every node); :meth:`shared.task.models.TextClassifier.place` then moves the forward passes to the device and
dtype :func:`placement` gives.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from seedtune.shared.task.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), rather than emulating it slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def placement(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the forward passes, resolved and checked: ``auto`` picks CUDA, then MPS, then the
    CPU (logged); a device this machine lacks is a :class:`~shared.task.config.ConfigError` naming it."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
        log.info("model.device = auto: forward passes on %s", name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device {config.device!r}: this machine has no CUDA device (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"model.device {config.device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device {config.device!r}: MPS is not available on this machine; use cpu or auto")
    device, dtype = torch.device(name), TORCH_DTYPES[config.dtype]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        log.warning("model.dtype = bfloat16 on a CPU without AVX-512 BF16 or AMX: emulated, likely slower than "
                    "float32")
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("model.dtype = float16 on the CPU: few CPU kernels are fast in float16; bfloat16 usually is")
    return device, dtype
