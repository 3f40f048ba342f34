"""Where and how torch runs: the device, the autocast precision, the CPU thread count.

The encoder runs on the GPU when there is one (bf16 autocast), else on the CPU in fp32 (this CPU
class has no native bf16).
"""
from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 on GPU by default; fp32 on CPU unless asked."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int | None, faiss: bool = False) -> None:
    """Bound torch's (and, with ``faiss``, faiss's OpenMP) CPU threads; None or 0 leaves them."""
    if not threads:
        return
    torch.set_num_threads(threads)
    if faiss:
        import faiss as faiss_lib

        faiss_lib.omp_set_num_threads(threads)
