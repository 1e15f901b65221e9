"""The H100 (SXM, sm_90) model the static reading predicts with; every assumption is here.

Ceilings are DESIGN.md §5's measured figures (copy ~3.0 TB/s, bf16 matmul ~800 TFLOP/s);
the fp8 figure is bench/NOTES.md's (~1300 TFLOP/s dense).  Occupancy uses the sm_90
per-SM limits; the issue model: 4 schedulers per SM, one warp instruction per clock each,
MUFU 16 lanes per clock per SM.
"""
from __future__ import annotations

SMS = 132
CLOCK_HZ = 1.755e9             # sustained SM clock under load (boost is 1.98 GHz)
COPY_BYTES_PER_S = 3.0e12      # DESIGN.md §5
PEAK_FLOPS = {"bf16": 800e12, "fp8": 1300e12}  # DESIGN.md §5; fp8: bench/NOTES.md ## fp8_head
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024       # of which 1 KiB per CTA is reserved by the system
SMEM_RESERVED_PER_CTA = 1024
ISSUE_PER_SM_PER_CLOCK = 4     # warp instructions
MUFU_PER_SM_PER_CLOCK = 16     # thread operations

ASSUMPTIONS = [
    f"{SMS} SMs at {CLOCK_HZ / 1e9:.3f} GHz; copy bandwidth {COPY_BYTES_PER_S / 1e12:.1f} TB/s; "
    f"bf16 {PEAK_FLOPS['bf16'] / 1e12:.0f} / fp8 {PEAK_FLOPS['fp8'] / 1e12:.0f} TFLOP/s dense",
    "issue bound: every per-element SASS instruction is one of 4 warp-issue slots per SM per clock "
    "(no stalls); MUFU bound: 16 lanes per SM per clock",
    "predicted = max(memory floor, compute floor, issue bound, MUFU bound) x wave quantization; "
    "overlap is assumed perfect, so a prediction is a lower bound on the time",
]


def occupancy(registers: int, threads: int, smem_bytes: int) -> dict:
    """CTAs per SM and what limits them (registers allocated per warp in units of 256)."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": REGISTERS_PER_SM // (per_warp * warps) if registers else MAX_CTAS_PER_SM,
        "threads": MAX_THREADS_PER_SM // threads,
        "shared memory": SMEM_PER_SM // (smem_bytes + SMEM_RESERVED_PER_CTA),
        "CTA slots": MAX_CTAS_PER_SM,
    }
    ctas = min(limits.values())
    return {"ctas_per_sm": ctas, "limited_by": min(limits, key=limits.get),
            "occupancy": ctas * warps / (MAX_THREADS_PER_SM // 32)}


def waves(ctas: int, ctas_per_sm: int) -> float:
    """Time factor of the last partial wave: ceil(waves) / waves (1.0 when the grid fills evenly)."""
    if ctas <= 0 or ctas_per_sm <= 0:
        return 1.0
    exact = ctas / (SMS * ctas_per_sm)
    return -(-ctas // (SMS * ctas_per_sm)) / exact if exact > 0 else 1.0


def bounds_ms(*, bytes_: int, flops: int, flop_kind: str | None, elements: int = 0,
              instructions_per_element: float | None = None, mufu_per_element: float | None = None) -> dict:
    out = {"memory_floor_ms": 1e3 * bytes_ / COPY_BYTES_PER_S if bytes_ else None,
           "compute_floor_ms": 1e3 * flops / PEAK_FLOPS[flop_kind] if flops else None,
           "issue_bound_ms": None, "mufu_bound_ms": None}
    if elements and instructions_per_element is not None:
        out["issue_bound_ms"] = 1e3 * elements * instructions_per_element / 32 / (
            SMS * ISSUE_PER_SM_PER_CLOCK * CLOCK_HZ)
    if elements and mufu_per_element is not None:
        out["mufu_bound_ms"] = 1e3 * elements * mufu_per_element / (SMS * MUFU_PER_SM_PER_CLOCK * CLOCK_HZ)
    return out
