"""Claim: each fused Triton kernel in txcompile.backends.triton.kernels is faster than the unfused eager PyTorch ops it
replaces, and holds its own against torch.compile of those same ops, at BERT-base and Llama-7B shapes, while matching
eager to the dtype's tolerance.

Set-up. Per kernel, shape and dtype, three implementations are checked and timed in one run, as ratios to eager:
    eager          the unfused ATen ops a model runs: `x + r` then `F.layer_norm` / `F.rms_norm`;
                   `torch.softmax(x * scale + bias, -1)`; `F.linear` then `F.gelu`; `F.silu(F.linear(x, w_gate)) *
                   F.linear(x, w_up)` (or one fused gate_up `F.linear`, chunked); `torch._int_mm` then the dequantize
                   epilogue `acc * x_scale * w_scale + bias`; `F.scaled_dot_product_attention`. On CUDA SDPA is
                   pinned with `torch.nn.attention.sdpa_kernel`: FLASH_ATTENTION where the inputs allow it (fp16/bf16,
                   no mask), EFFICIENT_ATTENTION for a mask or bias (key padding, an ALiBi-style [1, H, T, T] bias),
                   MATH only if that one refuses; the backend that ran is in each row. Varlen: eager is SDPA on the
                   padded batch with its key-padding mask (what a model runs without `unpad`); the kernel runs on the
                   packed real tokens only (packing is not timed), so that ratio includes the padding it skips.
    torch.compile  of that same eager function (dynamic=False, `--compile-mode`, dynamo reset before each row).
    triton         the txcompile kernel (`add_layer_norm`, `add_rms_norm`, `softmax`, `linear_act`, `linear_swiglu`,
                   `linear_swiglu_fused`, `attention`, `varlen_attention`, `int8_gemm`), autotuned on its first call.
Shapes: tokens M in {2048, 8192} at hidden 768 / FFN 3072 (BERT-base) and hidden 4096 / FFN 11008 (Llama-7B);
attention B x H x T x D of 16x12x128x64, 8x12x512x64 (plain, key padding, ALiBi bias), 8x32x2048x128 causal and
grouped-query 32/8 causal; softmax over BERT [8, 12, 512, 512] scores with a padding mask and Llama [2, 32, 2048, 2048]
with a causal mask; varlen: BERT-base, 16 sequences, lengths drawn uniformly from [0.2, 1.0] x 512 (mean 60% of the
maximum, as in ByteTransformer). Random inputs, weights scaled by 1/sqrt(K), seed 0.
dtypes on CUDA: fp16 and bf16, plus fp32 for the norms and softmax; int8_gemm's dtype is its output dtype.

Correctness before timing: every compiled and Triton output is compared with eager's; |out - eager| <= atol + rtol *
|eager| elementwise, (atol, rtol) = (1e-4, 1e-4) fp32, (5e-3, 5e-3) fp16, (3e-2, 3e-2) bf16: the rounding of one
fused kernel against several unfused ops, not more. The max abs error goes into the table and JSON; an output out of
tolerance marks its row FAILED and is not timed.

Timing. CUDA: `triton.testing.do_bench` per implementation (warm-up, L2 flushed before each call, median with the
20th/80th percentiles; `--rep-ms` of repetitions). Times include each call's host-side launch cost (the Triton
launchers' argument checks and autotune lookup, eager's op dispatch), as a model pays it without CUDA graphs.
Throughput on CUDA, from the median time and the count documented in each kernel module: GB/s for the memory-bound
kernels (add+norm: 4 element sizes per element, read x and residual, write summed and normed; softmax: 2 element
sizes per element plus the bias once), TFLOP/s for the GEMMs (2*M*N*K per product; SwiGLU two products; int8 as int ops)
and attention (4*B*H*D per visible query-key pair, causal counting the lower triangle; varlen counting real pairs
only). The same numerator is used for all three columns, so the unfused paths' extra traffic shows as a lower figure.
CPU: only fp32 eager vs torch.compile is meaningful; both are timed round-robin with `txcompile.timing.round_robin`
(`--reps` rounds after a warm-up, median) and the Triton column says "not measured: needs a CUDA GPU" (the kernels
are never timed under the interpreter, and no GPU figure is ever estimated). A torch.compile failure is a note in its
row, not a crash. Writes kernels.json (device, torch / triton versions, settings, every row) and kernels.png to --out.

Run from the repository root:  python benchmarks/kernels.py [--quick] [--kernels attention softmax ...]
    [--dtypes fp16 bf16] [--no-compile] [--compile-mode max-autotune] [--reps 5] [--rep-ms 100] [--out DIR]
The full set is 50 rows on a GPU, most of the time going to torch.compile's first calls (--kernels splits it); on a
CPU it is slow (large fp32 GEMMs and attention on few cores). `--quick` is a smoke run: one small shape per case,
fp16 only on CUDA, fewer repetitions.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(Path(__file__).resolve().parent) not in sys.path:  # _common lives next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from rich import box
from rich.markup import escape
from rich.table import Table

from _common import add_out_argument, console, log, machine, out_dir, write_json
from txcompile.backends.triton.kernels import add_norm, attention, int8_gemm, linear_epilogue, softmax
from txcompile.timing import round_robin

try:
    import triton as _triton
except ImportError:  # the kernel modules import without it; only a CUDA run needs it
    _triton = None

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol) of |out - eager| <= atol + rtol * |eager|, by output dtype.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (5e-3, 5e-3), "bf16": (3e-2, 3e-2)}
IMPLS = ("eager", "torch.compile", "triton")
LN_EPS, RMS_EPS = 1e-5, 1e-6
NOT_ON_CPU = "not measured: needs a CUDA GPU"
HALF = ("fp16", "bf16")
WITH_FP32 = ("fp32", "fp16", "bf16")


# The eager functions: the unfused ops, and what torch.compile is given.


def eager_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, LN_EPS), s


def eager_add_rms_norm(x, r, w):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, RMS_EPS), s


def eager_softmax(x, bias, *, scale: float):
    return torch.softmax(x * scale + bias, dim=-1)


def eager_linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def eager_swiglu(x, w_gate, w_up):
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def eager_swiglu_fused(x, w_gate_up):
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


def eager_int8_linear(x_q, w_q, w_scale, bias, *, x_scale: float, out_dtype: torch.dtype):
    acc = torch._int_mm(x_q, w_q.t())
    return (acc.float() * x_scale * w_scale + bias).to(out_dtype)


def eager_sdpa(q, k, v, mask, *, causal: bool, gqa: bool):
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


# Set-ups: inputs, the eager function and the kernel call for one shape and dtype.


@dataclass
class Setup:
    eager: Callable[..., Any]  # the unfused function; torch.compile gets the same one
    args: tuple  # its inputs
    kernel: Callable[[], Any]  # the Triton call on the same data
    metric: str  # "GB/s" or "TFLOP/s"
    work: float  # bytes moved or FLOPs per call, as documented in the kernel module
    sdpa: tuple[str, ...] = ()  # SDPBackend names to try in order (CUDA only)
    to_kernel_layout: Callable[[Any], Any] = lambda out: out  # eager output -> the kernel's layout
    info: dict[str, Any] = field(default_factory=dict)


def randn(*shape: int, dtype: torch.dtype, device: torch.device, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * std).to(dtype)


def lengths_mask(b: int, t: int, device: torch.device) -> torch.Tensor:
    """[B, T] bool, True for the real tokens: lengths uniform in [0.2, 1.0] x T (mean 60%), the first one T."""
    gen = torch.Generator().manual_seed(b * 1000 + t)
    lengths = torch.randint(max(1, round(0.2 * t)), t + 1, (b,), generator=gen)
    lengths[0] = t  # the batch is padded to T, as a serving system pads to its bucket
    return (torch.arange(t)[None] < lengths[:, None]).to(device)


def build_add_layer_norm(dtype, device, *, M: int, C: int) -> Setup:
    x, r = randn(M, C, dtype=dtype, device=device), randn(M, C, dtype=dtype, device=device)
    w, b = 1 + randn(C, dtype=dtype, device=device, std=0.1), randn(C, dtype=dtype, device=device, std=0.1)
    return Setup(eager_add_layer_norm, (x, r, w, b), lambda: add_norm.add_layer_norm(x, r, w, b, eps=LN_EPS),
                 "GB/s", 4 * x.element_size() * M * C)  # fmt: skip


def build_add_rms_norm(dtype, device, *, M: int, C: int) -> Setup:
    x, r = randn(M, C, dtype=dtype, device=device), randn(M, C, dtype=dtype, device=device)
    w = 1 + randn(C, dtype=dtype, device=device, std=0.1)
    return Setup(eager_add_rms_norm, (x, r, w), lambda: add_norm.add_rms_norm(x, r, w, eps=RMS_EPS), "GB/s",
                 4 * x.element_size() * M * C)  # fmt: skip


def build_softmax(dtype, device, *, B: int, H: int, T: int, D: int, mask: str) -> Setup:
    x = randn(B, H, T, T, dtype=dtype, device=device, std=math.sqrt(D))  # raw q.k scores: std sqrt(D)
    scale, neg = 1 / math.sqrt(D), torch.finfo(dtype).min
    if mask == "padding":  # BERT's extended attention mask: [B, 1, 1, T], dtype min on the padding
        bias = torch.zeros(B, 1, 1, T, dtype=dtype, device=device)
        bias.masked_fill_(~lengths_mask(B, T, device)[:, None, None, :], neg)
    else:  # causal: [1, 1, T, T]
        bias = torch.zeros(1, 1, T, T, dtype=dtype, device=device)
        bias.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=device).triu(1), neg)
    work = (2 * x.numel() + bias.numel()) * x.element_size()
    return Setup(functools.partial(eager_softmax, scale=scale), (x, bias),
                 lambda: softmax.softmax(x, bias, scale), "GB/s", work)  # fmt: skip


def build_linear_act(dtype, device, *, M: int, K: int, N: int) -> Setup:
    x, w = randn(M, K, dtype=dtype, device=device), randn(N, K, dtype=dtype, device=device, std=K**-0.5)
    b = randn(N, dtype=dtype, device=device, std=0.1)
    return Setup(eager_linear_gelu, (x, w, b), lambda: linear_epilogue.linear_act(x, w, b, "gelu"), "TFLOP/s",
                 2 * M * N * K)  # fmt: skip


def build_linear_swiglu(dtype, device, *, M: int, K: int, N: int) -> Setup:
    x = randn(M, K, dtype=dtype, device=device)
    wg, wu = (randn(N, K, dtype=dtype, device=device, std=K**-0.5) for _ in range(2))
    return Setup(eager_swiglu, (x, wg, wu), lambda: linear_epilogue.linear_swiglu(x, wg, wu), "TFLOP/s",
                 4 * M * N * K)  # fmt: skip


def build_linear_swiglu_fused(dtype, device, *, M: int, K: int, N: int) -> Setup:
    x, w = randn(M, K, dtype=dtype, device=device), randn(2 * N, K, dtype=dtype, device=device, std=K**-0.5)
    return Setup(eager_swiglu_fused, (x, w), lambda: linear_epilogue.linear_swiglu_fused(x, w), "TFLOP/s",
                 4 * M * N * K)  # fmt: skip


def build_int8_gemm(dtype, device, *, M: int, K: int, N: int) -> Setup:
    x_q = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    w_scale = torch.rand(N, device=device) * 0.01 + 0.005
    bias, x_scale = torch.randn(N, device=device) * 0.1, 0.02
    eager = functools.partial(eager_int8_linear, x_scale=x_scale, out_dtype=dtype)
    return Setup(eager, (x_q, w_q, w_scale, bias),
                 lambda: int8_gemm.int8_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype=dtype), "TFLOP/s",
                 2 * M * N * K)  # fmt: skip


def alibi(h: int, t: int, dtype, device) -> torch.Tensor:
    """An ALiBi-style additive bias [1, H, T, T]: -slope_h * |i - j|, slopes 2^(-8 h / H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1, device=device) / h)
    pos = torch.arange(t, device=device)
    return (-slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()).to(dtype)[None]


def build_attention(dtype, device, *, B: int, H: int, T: int, D: int, Hkv: int | None = None, causal: bool = False,
                    mask: str | None = None) -> Setup:  # fmt: skip
    hkv = Hkv or H
    q = randn(B, H, T, D, dtype=dtype, device=device)
    k, v = (randn(B, hkv, T, D, dtype=dtype, device=device) for _ in range(2))
    attn_mask, kwargs = None, {}
    if mask == "padding":
        valid = lengths_mask(B, T, device)
        attn_mask, kwargs = valid[:, None, None, :], {"key_padding": valid}
    elif mask == "alibi":
        attn_mask = alibi(H, T, dtype, device)
        kwargs = {"bias": attn_mask}
    pairs = T * (T + 1) // 2 if causal else T * T
    # Flash takes no mask; with one, the efficient kernel (which takes a float bias) and only then math.
    sdpa = ("EFFICIENT_ATTENTION", "MATH") if mask else ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return Setup(functools.partial(eager_sdpa, causal=causal, gqa=hkv != H), (q, k, v, attn_mask),
                 lambda: attention.attention(q, k, v, causal=causal, **kwargs), "TFLOP/s", 4 * B * H * pairs * D,
                 sdpa=sdpa)  # fmt: skip


def build_varlen_attention(dtype, device, *, B: int, H: int, T: int, D: int) -> Setup:
    valid = lengths_mask(B, T, device)
    q, k, v = (randn(B, H, T, D, dtype=dtype, device=device) for _ in range(3))
    packed = [t.transpose(1, 2)[valid] for t in (q, k, v)]  # [total, H, D]: the real tokens only
    lengths = valid.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    max_len, total = int(lengths.max()), int(lengths.sum())
    useful = 4 * H * D * int((lengths.long() ** 2).sum())  # real query-key pairs only
    return Setup(functools.partial(eager_sdpa, causal=False, gqa=False), (q, k, v, valid[:, None, None, :]),
                 lambda: attention.varlen_attention(*packed, cu_seqlens, max_len), "TFLOP/s", useful,
                 sdpa=("EFFICIENT_ATTENTION", "MATH"), to_kernel_layout=lambda out: out.transpose(1, 2)[valid],
                 info={"tokens": total, "real_fraction": total / (B * T)})  # fmt: skip


BUILDERS: dict[str, Callable[..., Setup]] = {
    "add_layer_norm": build_add_layer_norm,
    "add_rms_norm": build_add_rms_norm,
    "softmax": build_softmax,
    "linear_act": build_linear_act,
    "linear_swiglu": build_linear_swiglu,
    "linear_swiglu_fused": build_linear_swiglu_fused,
    "attention": build_attention,
    "varlen_attention": build_varlen_attention,
    "int8_gemm": build_int8_gemm,
}


@dataclass(frozen=True)
class Case:
    kernel: str
    label: str
    shape: dict[str, Any]
    dtypes: tuple[str, ...] = HALF  # on CUDA; a CPU runs fp32 only


def cases(quick: bool) -> list[Case]:
    bert, llama = "BERT-base", "Llama-7B"
    if quick:
        return [
            Case("add_layer_norm", "tiny", {"M": 256, "C": 256}, WITH_FP32),
            Case("add_rms_norm", "tiny", {"M": 256, "C": 512}, WITH_FP32),
            Case("softmax", "tiny, padding mask", {"B": 2, "H": 4, "T": 128, "D": 64, "mask": "padding"}, WITH_FP32),
            Case("linear_act", "tiny, GELU", {"M": 256, "K": 256, "N": 1024}),
            Case("linear_swiglu", "tiny", {"M": 256, "K": 256, "N": 688}),
            Case("linear_swiglu_fused", "tiny", {"M": 256, "K": 256, "N": 688}),
            Case("attention", "tiny", {"B": 2, "H": 4, "T": 128, "D": 64}),
            Case("attention", "tiny, GQA causal", {"B": 2, "H": 4, "Hkv": 2, "T": 128, "D": 64, "causal": True}),
            Case("varlen_attention", "tiny, mean 60% of T", {"B": 4, "H": 4, "T": 128, "D": 64}),
            Case("int8_gemm", "tiny", {"M": 256, "K": 256, "N": 1024}),
        ]
    tokens = (2048, 8192)
    return [
        *(Case("add_layer_norm", bert, {"M": m, "C": 768}, WITH_FP32) for m in tokens),
        *(Case("add_rms_norm", llama, {"M": m, "C": 4096}, WITH_FP32) for m in tokens),
        Case("softmax", f"{bert}, padding mask", {"B": 8, "H": 12, "T": 512, "D": 64, "mask": "padding"}, WITH_FP32),
        Case("softmax", f"{llama}, causal mask", {"B": 2, "H": 32, "T": 2048, "D": 128, "mask": "causal"}, WITH_FP32),
        *(Case("linear_act", f"{bert} FFN up, GELU", {"M": m, "K": 768, "N": 3072}) for m in tokens),
        *(Case("linear_swiglu", f"{llama} MLP", {"M": m, "K": 4096, "N": 11008}) for m in tokens),
        *(Case("linear_swiglu_fused", f"{llama} MLP, fused gate_up", {"M": m, "K": 4096, "N": 11008}) for m in tokens),
        Case("attention", bert, {"B": 16, "H": 12, "T": 128, "D": 64}),
        Case("attention", f"{bert}, key padding", {"B": 8, "H": 12, "T": 512, "D": 64, "mask": "padding"}),
        Case("attention", f"{bert}, ALiBi bias", {"B": 8, "H": 12, "T": 512, "D": 64, "mask": "alibi"}),
        Case("attention", f"{llama}, causal", {"B": 8, "H": 32, "T": 2048, "D": 128, "causal": True}),
        Case("attention", "GQA 32/8, causal", {"B": 8, "H": 32, "Hkv": 8, "T": 2048, "D": 128, "causal": True}),
        Case("varlen_attention", f"{bert}, mean 60% of T", {"B": 16, "H": 12, "T": 512, "D": 64}),
        *(Case("int8_gemm", f"{bert} FFN up", {"M": m, "K": 768, "N": 3072}) for m in tokens),
        *(Case("int8_gemm", f"{llama} MLP up", {"M": m, "K": 4096, "N": 11008}) for m in tokens),
    ]


def shape_text(shape: dict[str, Any]) -> str:
    parts = []
    for key, value in shape.items():
        if key == "Hkv":
            parts[-1] += f"/{value}" if parts and parts[-1].startswith("H=") else ""
        elif key not in ("causal", "mask"):
            parts.append(f"{key}={value}")
    return " ".join(parts)


# Checking and timing.


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare(out: Any, ref: Any, dtype_name: str) -> tuple[float, bool]:
    """(max abs error over every output tensor, whether all are within the dtype's tolerance of eager's)."""
    atol, rtol = TOLERANCES[dtype_name]
    outs, refs = tensors(out), tensors(ref)
    if len(outs) != len(refs) or any(a.shape != b.shape for a, b in zip(outs, refs)):
        return math.inf, False
    err, ok = 0.0, True
    for a, b in zip(outs, refs):
        a, b = a.float(), b.float()
        diff = (a - b).abs()
        ok = ok and bool((diff <= atol + rtol * b.abs()).all())  # NaN compares False: a NaN fails
        if diff.numel():
            err = max(err, float(diff.nan_to_num(nan=math.inf).max()))
    return err, ok


def sdpa_context(setup: Setup, device: torch.device) -> tuple[AbstractContextManager, str | None]:
    """The first SDPA backend in setup.sdpa that runs these inputs (pinned with sdpa_kernel), CUDA only."""
    if device.type != "cuda" or not setup.sdpa:
        return nullcontext(), ("default (CPU)" if setup.sdpa else None)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    refused = []
    for name in setup.sdpa:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)), torch.no_grad():
                setup.eager(*setup.args)
            sync(device)
        except RuntimeError as e:
            refused.append(f"{name}: {first_line(e)}")
            continue
        return sdpa_kernel(getattr(SDPBackend, name)), name
    raise RuntimeError("no SDPA backend ran these inputs; " + "; ".join(refused))


def time_candidates(candidates: dict[str, Callable[[], Any]], args: argparse.Namespace,
                    device: torch.device) -> dict[str, tuple[float, float | None, float | None]]:  # fmt: skip
    """Milliseconds per call of each candidate: (median, 20th and 80th percentile), percentiles on CUDA only."""
    if device.type == "cuda":
        from triton.testing import do_bench

        timed = {}
        for name, fn in candidates.items():
            med, lo, hi = do_bench(fn, warmup=max(5, args.rep_ms // 4), rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
            timed[name] = (med, lo, hi)
        return timed
    return {name: (s * 1e3, None, None) for name, s in round_robin(candidates, args.reps, warmup=1).items()}


def empty_impl() -> dict[str, Any]:
    return {"ms": None, "ms_p20": None, "ms_p80": None, "speedup": None, "throughput": None, "max_abs_err": None,
            "ok": None, "note": None}  # fmt: skip


def measure(case: Case, dtype_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row: build, check compile and Triton against eager, time what passed."""
    impls = {name: empty_impl() for name in IMPLS}
    row: dict[str, Any] = {"kernel": case.kernel, "case": case.label, "shape": dict(case.shape), "dtype": dtype_name,
                           "status": "ok", "notes": [], "impls": impls}  # fmt: skip

    def fail(status: str, note: str) -> dict[str, Any]:
        row["status"] = status
        row["notes"].append(note)
        return row

    torch.manual_seed(0)
    try:
        setup = BUILDERS[case.kernel](DTYPES[dtype_name], device, **case.shape)
        row.update(metric=setup.metric, work=setup.work, **setup.info)
        context, backend = sdpa_context(setup, device)
    except Exception as e:  # out of memory, an SDPA refusal: the row has no baseline
        return fail("error", f"eager failed: {first_line(e)}")
    if backend:
        row["sdpa_backend"] = backend
    with context, torch.no_grad():
        ref = setup.eager(*setup.args)
        sync(device)
        impls["eager"].update(max_abs_err=0.0, ok=True)
        candidates: dict[str, Callable[[], Any]] = {"eager": lambda: setup.eager(*setup.args)}

        compiled = None
        if args.no_compile:
            impls["torch.compile"]["note"] = "skipped (--no-compile)"
        else:
            torch._dynamo.reset()  # a fresh cache per row: no recompile limit, no dynamic-shape fallback
            compiled = torch.compile(setup.eager, dynamic=False, mode=args.compile_mode)
            start = time.perf_counter()
            try:
                out = compiled(*setup.args)
                sync(device)
            except Exception as e:
                impls["torch.compile"]["note"] = f"torch.compile failed: {first_line(e)}"
                row["notes"].append(impls["torch.compile"]["note"])
                compiled = None
            else:
                impls["torch.compile"]["compile_s"] = time.perf_counter() - start
                err, ok = compare(out, ref, dtype_name)
                impls["torch.compile"].update(max_abs_err=err, ok=ok)
                if ok:
                    candidates["torch.compile"] = lambda: compiled(*setup.args)
                else:
                    fail("FAILED", f"torch.compile: max abs err {err:.3g} beyond tolerance {TOLERANCES[dtype_name]}")
                    impls["torch.compile"]["note"] = "FAILED (not timed)"
                del out

        if device.type != "cuda":
            impls["triton"]["note"] = NOT_ON_CPU
        elif _triton is None:
            impls["triton"]["note"] = "not measured: triton is not installed"
        else:
            try:
                out = setup.kernel()  # autotunes on this first call
                sync(device)
            except Exception as e:
                impls["triton"]["note"] = f"error: {first_line(e)}"
                fail("error", f"triton: {first_line(e)}")
            else:
                err, ok = compare(out, setup.to_kernel_layout(ref), dtype_name)
                impls["triton"].update(max_abs_err=err, ok=ok)
                if ok:
                    candidates["triton"] = setup.kernel
                else:
                    fail("FAILED", f"triton: max abs err {err:.3g} beyond tolerance {TOLERANCES[dtype_name]}")
                    impls["triton"]["note"] = "FAILED (not timed)"
                del out
        del ref

        log.print(f"{case.kernel} {case.label} {shape_text(case.shape)} {dtype_name}: timing {', '.join(candidates)}",
                  markup=False, soft_wrap=True)  # fmt: skip
        timed = time_candidates(candidates, args, device)
    base = timed["eager"][0]
    scale = 1e9 if setup.metric == "GB/s" else 1e12
    for name, (ms, lo, hi) in timed.items():
        impls[name].update(ms=ms, ms_p20=lo, ms_p80=hi, speedup=base / ms)
        if device.type == "cuda":
            impls[name]["throughput"] = setup.work / (ms * 1e-3) / scale
    return row


# Output.


def dtype_text(row: dict[str, Any]) -> str:
    return f"int8->{row['dtype']}" if row["kernel"] == "int8_gemm" else row["dtype"]


def impl_cell(impl: dict[str, Any]) -> str:
    if impl["ms"] is None:
        return impl["note"] or "-"
    return f"{impl['speedup']:.2f}x ({impl['ms']:.3g} ms)"


def err_text(impl: dict[str, Any]) -> str:
    return "-" if impl["max_abs_err"] is None else f"{impl['max_abs_err']:.1e}"


def table(result: dict[str, Any]) -> Table:
    cuda = result["settings"]["device_type"] == "cuda"
    title = (
        f"Triton kernels vs eager PyTorch and torch.compile on {result['machine']['device']} "
        f"(torch {result['machine']['torch']}, triton {result['machine']['triton']}); ratios = eager time / time"
    )
    t = Table(title=escape(title), box=box.SIMPLE_HEAD)
    columns = ["kernel", "case", "shape", "dtype", "eager ms", "torch.compile", "triton",
               "max abs err vs eager\n(compile / triton)"]  # fmt: skip
    if cuda:
        columns.append("GB/s or TFLOP/s\n(eager / compile / triton)")
    for col in [*columns, "status"]:
        t.add_column(col)
    for r in result["rows"]:
        im = r["impls"]
        eager_ms = "-" if im["eager"]["ms"] is None else f"{im['eager']['ms']:.3g}"
        errors = f"{err_text(im['torch.compile'])} / {err_text(im['triton'])}"
        cells = [r["kernel"], r["case"], shape_text(r["shape"]), dtype_text(r), eager_ms,
                 impl_cell(im["torch.compile"]), impl_cell(im["triton"]), errors]  # fmt: skip
        if cuda:
            tp = [im[n]["throughput"] for n in IMPLS]
            cells.append(" / ".join("-" if v is None else f"{v:.3g}" for v in tp) + f" {r.get('metric', '')}")
        status = "; ".join(
            [r["status"], *r["notes"]] + ([f"SDPA {r['sdpa_backend']}"] if r.get("sdpa_backend") else [])
        )
        t.add_row(*(escape(c) for c in [*cells, status]))
    return t


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    out: dict[str, Any] = {"rows": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
                           "failed": [f"{r['kernel']} {r['case']} {dtype_text(r)}" for r in rows
                                      if r["status"] != "ok"]}  # fmt: skip
    for name in ("torch.compile", "triton"):
        speedups = [r["impls"][name]["speedup"] for r in rows if r["impls"][name]["speedup"]]
        out[f"{name} geomean vs eager"] = geomean(speedups)
        out[f"{name} rows timed"] = len(speedups)
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["impls"]["eager"]["ms"]]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * len(rows)))
    ys = range(len(rows))
    for offset, (name, color) in zip((-0.2, 0.2), (("torch.compile", "tab:blue"), ("triton", "tab:orange"))):
        values = [r["impls"][name]["speedup"] or 0.0 for r in rows]
        ax.barh([y + offset for y in ys], values, height=0.4, color=color, label=name)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(list(ys), [f"{r['kernel']} {r['case']} {shape_text(r['shape'])} {dtype_text(r)}" for r in rows],
                  fontsize=7)  # fmt: skip
    ax.invert_yaxis()
    ax.set(xlabel="speed vs eager (eager time / time); 0 = not measured",
           title=f"Triton kernels on {result['machine']['device']}")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--kernels", nargs="+", choices=sorted(BUILDERS), metavar="NAME",
                   help=f"only these kernels (default: all): {', '.join(BUILDERS)}")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), metavar="DTYPE",
                   help="on CUDA, these of fp32/fp16/bf16 for every case (default: per case)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    p.add_argument("--reps", type=int, default=5, help="CPU: round-robin timing rounds (default 5)")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench repetition time in ms (default 100)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (default: default)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape per case, fewer repetitions")
    add_out_argument(p, "kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.rep_ms = min(args.reps, 3), min(args.rep_ms, 25)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and _triton is None:
        log.print("timing on CUDA uses triton.testing.do_bench, and torch.compile needs triton: pip install triton")
        return 2
    if device.type != "cuda" and args.dtypes and args.dtypes != ["fp32"]:
        log.print("--dtypes applies on CUDA only: on a CPU only fp32 eager vs torch.compile is measured")
    out = out_dir(args.out)
    rows = []
    for case in cases(args.quick):
        if args.kernels and case.kernel not in args.kernels:
            continue
        if device.type != "cuda":
            dtypes = ("fp32",)
        else:
            dtypes = tuple(args.dtypes) if args.dtypes else (("fp16",) if args.quick else case.dtypes)
        for dtype_name in dtypes:
            try:
                rows.append(measure(case, dtype_name, args, device))
            except Exception as e:  # e.g. out of memory while timing: a visible row, and on to the next
                log.print(f"{case.kernel} {case.label} {dtype_name}: {first_line(e)}", markup=False, soft_wrap=True)
                impls = {name: empty_impl() for name in IMPLS}
                rows.append({"kernel": case.kernel, "case": case.label, "shape": dict(case.shape), "dtype": dtype_name,
                             "status": "error", "notes": [first_line(e)], "impls": impls})  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result: dict[str, Any] = {
        "claim": " ".join(__doc__.split("\n\n")[0].split()),
        "args": vars(args),
        "machine": machine(device),
        "settings": {
            "device_type": device.type,
            "timer": "triton.testing.do_bench (L2 flushed, median)"
            if device.type == "cuda"
            else "txcompile.timing.round_robin (median)",
            "tolerances (atol, rtol)": TOLERANCES,
            "torch.compile": None if args.no_compile else {"dynamic": False, "mode": args.compile_mode or "default"},
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "eps": {"layer_norm": LN_EPS, "rms_norm": RMS_EPS},
        },  # fmt: skip
        "rows": rows,
    }
    result["summary"] = summary(result)
    out_console = console(width=220)
    out_console.print(table(result))
    s = result["summary"]
    for name in ("torch.compile", "triton"):
        g = s[f"{name} geomean vs eager"]
        out_console.print(f"{name}: geomean {g:.2f}x eager over {s[f'{name} rows timed']} rows" if g
                          else f"{name}: no row timed", markup=False)  # fmt: skip
    not_ok = f"; not ok: {', '.join(s['failed'])}" if s["failed"] else ""
    out_console.print(f"{s['ok']} of {s['rows']} rows ok{not_ok}", markup=False)
    path = write_json(out / "kernels.json", result)
    wrote = [str(path)] + ([str(out / "kernels.png")] if plot(result, out / "kernels.png") else [])
    out_console.print(f"wrote {' and '.join(wrote)}", markup=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
