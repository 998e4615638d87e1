"""Hidden states on disk and one decoder layer run over them.

States are ``np.memmap`` arrays ``[N, T, hidden]`` (fp32) read ``batch_size`` sequences at a
time; ``run(layer, x)`` is the family's layer call (:func:`rmtkd.adapters.llama.run_layer`
with the config, index and position embeddings bound).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..ops.covariance import CovarianceAccumulator

Run = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def memmap(path: Path, shape: tuple, fresh: bool) -> np.memmap:
    return np.memmap(path, dtype=np.float32, mode="w+" if fresh or not path.exists() else "r+",
                     shape=shape)


def read_rows(mm: np.memmap, a: Any, b: Any = None) -> torch.Tensor:
    """Rows of a memmap as a fresh (aligned, writable) fp32 tensor."""
    arr = mm[a:b] if b is not None else mm[a]
    return torch.from_numpy(np.array(arr, dtype=np.float32))


@torch.no_grad()
def teacher_pass(layer: nn.Module, run: Run, states: np.memmap,
                 targets: np.memmap | None, *,
                 batch_size: int, device: Any, sites: dict[str, tuple[str, str]],
                 acc_dtype: torch.dtype) -> dict[str, CovarianceAccumulator]:
    """The layer on the stored states -> ``targets`` (unless None); on the way, one
    covariance accumulator per site (``{site name: (module name, "input" | "output")}``)."""
    accs: dict[str, CovarianceAccumulator] = {}
    handles = []

    def feed(site: str, x: torch.Tensor) -> None:
        if site not in accs:
            accs[site] = CovarianceAccumulator(x.shape[-1], acc_dtype=acc_dtype,
                                               device=device)
        accs[site].update(x.detach())

    for site, (mod_name, where) in sites.items():
        mod = layer.get_submodule(mod_name)
        if where == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, s=site: feed(s, args[0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda _m, _a, out, s=site: feed(s, out)))
    try:
        for a, b in chunks(states.shape[0], batch_size):
            y = run(layer, read_rows(states, a, b).to(device))
            if targets is not None:
                targets[a:b] = y.float().cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return accs


@torch.no_grad()
def run_states(layer: nn.Module, run: Run, states: np.memmap, *, batch_size: int,
               device: Any, targets: np.memmap | None = None, out: np.memmap | None = None
               ) -> float:
    """The layer on ``states``: writes the outputs to ``out`` and returns the root mean
    over tokens of ``||y - t||^2 / ||t||^2`` (:func:`token_error`; NaN without targets)."""
    num, count = 0.0, 0
    for a, b in chunks(states.shape[0], batch_size):
        y = run(layer, read_rows(states, a, b).to(device)).float()
        if targets is not None:
            t = read_rows(targets, a, b).to(device)
            num += float(token_error(y.double(), t.double()).sum())
            count += t[..., 0].numel()
        if out is not None:
            out[a:b] = y.cpu().numpy()
    return (num / max(count, 1)) ** 0.5 if targets is not None else float("nan")


def token_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per token (the last axis is the hidden size): ``||y - t||^2 / ||t||^2``. Relative
    per token, not over the batch: in decoders a few tokens (each sequence's first) carry
    massive activations, 99% of the squared norm of SmolLM2's residual stream, and an error
    summed over all tokens would only see them, while the next block reads every token
    RMS-normalised."""
    return (y - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)


def distill_layer(layer: nn.Module, run: Run, states: np.memmap, targets: np.memmap, *,
                  batch_size: int, device: Any, epochs: int, lr: float,
                  gen: torch.Generator) -> None:
    """Local distillation: Adam on the mean per-token relative squared error
    (:func:`token_error`) of the layer's outputs to ``targets`` (the original layer's),
    ``epochs`` shuffled passes."""
    params = list(layer.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    layer.train()
    n = states.shape[0]
    try:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for idx in perm.split(batch_size):
                idx = np.sort(idx.numpy())
                x, t = read_rows(states, idx).to(device), read_rows(targets, idx).to(device)
                y = run(layer, x)
                loss = token_error(y, t).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        layer.eval()
        for p in params:
            p.requires_grad_(False)
