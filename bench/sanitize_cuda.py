"""One small call of each CUDA op of the C++ extension, for compute-sanitizer (gpu_suite.sh).

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cuda.py

Runs rmtkd::covariance_update (fp32 and bf16, with shift and mask, plus a tall narrow shape
that takes the row-split path), rmtkd::projected_linear (fp16 with bias, fp32 without) and
rmtkd::krylov_top on CUDA tensors at odd, small shapes, checks each result against torch,
and exits non-zero on a mismatch (memcheck itself reports out-of-bounds or misaligned
accesses). The extension must already be built (the suite's build step); this only loads it.
"""
from __future__ import annotations

import sys

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main() -> int:
    from rmtkd.ops.cuda_ext import load_extension

    load_extension(with_cuda=True)
    ops = torch.ops.rmtkd
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    bad = []
    for n, d, dtype in ((37, 45, torch.float32), (37, 45, torch.bfloat16),
                        (5000, 16, torch.float32)):
        x = torch.randn(n, d, device=dev, generator=g).to(dtype)
        shift = torch.randn(d, device=dev, generator=g)
        mask = torch.rand(n, device=dev, generator=g) < 0.6
        c = torch.zeros(d, d, device=dev)
        s = torch.zeros(d, device=dev)
        ops.covariance_update(x, shift, mask, c, s)
        xs = (x[mask].float() - shift).to(dtype).double()
        err = _rel(c.triu(), (xs.T @ xs).triu())
        if err > (1e-5 if dtype == torch.float32 else 1e-2):
            bad.append(f"covariance_update n={n} d={d} {dtype}: rel err {err:.2e}")
    for m, k, dtype, with_bias in ((5, 8, torch.float16, True), (3, 17, torch.float32, False)):
        x = torch.randn(m, 33, device=dev, generator=g).to(dtype)
        V = torch.randn(33, k, device=dev, generator=g).to(dtype)
        W = torch.randn(19, k, device=dev, generator=g).to(dtype)
        b = torch.randn(19, device=dev, generator=g).to(dtype) if with_bias else None
        y = ops.projected_linear(x, V, W, b)
        ref = torch.nn.functional.linear(x.double() @ V.double(), W.double(),
                                         None if b is None else b.double())
        err = _rel(y, ref)
        if err > (1e-5 if dtype == torch.float32 else 1e-2):
            bad.append(f"projected_linear m={m} k={k} {dtype}: rel err {err:.2e}")
    a = torch.randn(400, 65, device=dev, generator=g)
    cov = a.T @ a / 400
    vals, vecs, info = ops.krylov_top(cov, 2.0, float(cov.diagonal().sum()), 65, 400)
    if not bool(torch.isfinite(vecs).all()) or vals.numel() != int(info[4]):
        bad.append("krylov_top: non-finite vectors or a wrong number of values")
    torch.cuda.synchronize()
    for line in bad:
        print("MISMATCH", line, file=sys.stderr)
    print("sanitize_cuda: one call of each op done" + ("" if not bad else f", {len(bad)} bad"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
