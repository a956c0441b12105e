"""Hardware peaks the benchmarks divide by: dense bf16 tensor-core TFLOP/s per GPU model (NVIDIA datasheets).

Dense (no 2:4 sparsity) figures: H100 SXM and H200 SXM 989 TFLOP/s, H100 NVL and H200 NVL 835, H100 PCIe 756,
A100 312, L4 121. The first key contained in `torch.cuda.get_device_name()` wins (most specific first).
"""
from __future__ import annotations

__all__ = ["BF16_DENSE_PEAK_TFLOPS", "bf16_peak_tflops"]

BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("L4", 121.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, or None when the card is not in the table (or a CPU)."""
    for key, peak in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None
