"""Device and link assumptions for the distributed plan's alpha-beta cost model, and the collectives' costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["NETWORKS", "Network", "allgather_time", "allreduce_time"]


@dataclass(frozen=True)
class Network:
    """Device and link assumptions for the alpha-beta model. Model inputs, not measurements.

    alpha: seconds per message (per ring step); beta: seconds per byte on one link direction (1 / bandwidth);
    peak_flops: dense 16-bit matmul peak of one device; hbm_bytes_per_s: its memory bandwidth; memory_bytes: its
    capacity (for the "fits" column).

    Presets (datasheet numbers; the latency is an assumption in line with NCCL's small-message all-reduce times):
    - "h100-nvlink": H100 SXM5, NVLink 4 at 900 GB/s bidirectional = 450 GB/s per direction per GPU, alpha 1 us,
      989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 80 GB.
    - "a100-nvlink": A100 SXM4 80 GB, NVLink 3 at 600 GB/s bidirectional = 300 GB/s per direction, alpha 1 us,
      312 TFLOP/s dense BF16, 2.04 TB/s HBM2e, 80 GB.
    - "cpu-gloo": CPU processes over gloo (TCP/loopback), a modest guess: 5 GB/s, alpha 50 us, 200 GFLOP/s,
      20 GB/s memory bandwidth, 16 GB.
    Achieved NCCL bus bandwidth is usually 70-85 % of the link rate; that is not applied here.
    """

    name: str
    alpha: float
    beta: float
    peak_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float = 80e9
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alpha_s": self.alpha,
            "bandwidth_bytes_per_s": 1.0 / self.beta,
            "peak_flops": self.peak_flops,
            "hbm_bytes_per_s": self.hbm_bytes_per_s,
            "memory_bytes": self.memory_bytes,
            "description": self.description,
        }


NETWORKS: dict[str, Network] = {
    "h100-nvlink": Network(
        "h100-nvlink", 1e-6, 1 / 450e9, 989e12, 3.35e12, 80e9,
        "H100 SXM5: NVLink4 450 GB/s/direction, 1 us/step, 989 TFLOP/s BF16 dense, 3.35 TB/s HBM3, 80 GB",
    ),
    "a100-nvlink": Network(
        "a100-nvlink", 1e-6, 1 / 300e9, 312e12, 2.039e12, 80e9,
        "A100 SXM4: NVLink3 300 GB/s/direction, 1 us/step, 312 TFLOP/s BF16 dense, 2.04 TB/s HBM2e, 80 GB",
    ),
    "cpu-gloo": Network(
        "cpu-gloo", 50e-6, 1 / 5e9, 200e9, 20e9, 16e9,
        "CPU ranks over gloo: 5 GB/s, 50 us/message, 200 GFLOP/s, 20 GB/s memory (a guess)",
    ),
}  # fmt: skip


def allreduce_time(nbytes: float, n: int, net: Network) -> float:
    """Ring all-reduce of `nbytes` over `n` ranks: 2(n-1)/n * bytes * beta + 2(n-1) * alpha."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes * net.beta + 2 * (n - 1) * net.alpha


def allgather_time(nbytes: float, n: int, net: Network) -> float:
    """Ring all-gather of a result of `nbytes` in all over `n` ranks: (n-1)/n * bytes * beta + (n-1) * alpha."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes * net.beta + (n - 1) * net.alpha


def _allreduce_sent(nbytes: float, n: int) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes


def _allgather_sent(nbytes: float, n: int) -> float:
    return 0.0 if n <= 1 else (n - 1) / n * nbytes
