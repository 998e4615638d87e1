"""One decoder block of a Llama-layout model: load it, run it on memory-mapped hidden
states, collect its sites' covariances, cut it and distil it locally.

Used by :func:`rmtkd.blockwise.compress_blockwise`; ``cfg`` is its
:class:`~rmtkd.blockwise.BlockwiseConfig`. States are ``np.memmap`` arrays ``[N, T, hidden]``
(fp32) read ``batch_size`` sequences at a time; blocks run in fp32 on ``cfg.device``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..ops.covariance import CovarianceAccumulator
from ..reduce.plan import n_params
from .hfdir import layer_prefix

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linear modules that see the same input: one covariance serves the group.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def position_embeddings(config: Any, seq_len: int, device: Any) -> tuple:
    """``((cos, sin), position_ids)`` for positions 0..seq_len-1, as LlamaModel computes them
    (shared by every block and broadcast over the batch)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=config).to(device)
    pos = torch.arange(seq_len, device=device)[None]
    x = torch.zeros(1, seq_len, 1, device=device)
    return rotary(x, position_ids=pos), pos


def run_block(layer: nn.Module, x: torch.Tensor, config: Any, pe: tuple) -> torch.Tensor:
    """One decoder layer on ``x`` [B, T, hidden] (fp32), causal, as LlamaModel calls it."""
    from transformers.masking_utils import create_causal_mask

    (cos, sin), pos = pe
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None,
                              position_ids=pos)
    out = layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def load_layer(src: Any, i: int, device: Any) -> nn.Module:
    """Decoder layer ``i`` with its weights, in fp32 on ``device``."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(src.config, i)
    layer.to_empty(device=device)
    layer.load_state_dict({k: v.float() for k, v in src.prefixed(layer_prefix(i)).items()},
                          strict=True)
    return layer.float().eval()


def block_sites(cfg: Any, layer: nn.Module) -> dict[str, tuple[str, str]]:
    """``{site name: (module name, "input" | "output")}`` fitted in this block."""
    if cfg.mode == "width":
        return {"mlp.down_proj:input": ("mlp.down_proj", "input"),
                "self_attn.v_proj:output": ("self_attn.v_proj", "output")}
    names = cfg.sites or list(LINEARS)
    return {f"{SHARED_INPUT.get(n, n)}:input": (SHARED_INPUT.get(n, n), "input")
            for n in names}


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def read_rows(mm: np.memmap, a: Any, b: Any = None) -> torch.Tensor:
    """Rows of a memmap as a fresh (aligned, writable) fp32 tensor."""
    arr = mm[a:b] if b is not None else mm[a]
    return torch.from_numpy(np.array(arr, dtype=np.float32))


@torch.no_grad()
def teacher_pass(layer: nn.Module, states: np.memmap, targets: np.memmap, cfg: Any,
                  config: Any, pe: tuple, sites: dict) -> dict[str, CovarianceAccumulator]:
    """Original block on the stored states -> targets; site covariances on the way."""
    dev = torch.device(cfg.device)
    accs: dict[str, CovarianceAccumulator] = {}
    handles = []

    def feed(site: str, x: torch.Tensor) -> None:
        if site not in accs:
            accs[site] = CovarianceAccumulator(x.shape[-1], acc_dtype=getattr(
                torch, cfg.acc_dtype), device=dev)
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
        for a, b in chunks(states.shape[0], cfg.batch_size):
            y = run_block(layer, read_rows(states, a, b).to(dev), config, pe)
            targets[a:b] = y.float().cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return accs


def rel_error(layer: nn.Module, states: np.memmap, targets: np.memmap, cfg: Any,
               config: Any, pe: tuple, out: np.memmap | None = None) -> float:
    """``||layer(states) - targets|| / ||targets||``; writes the outputs to ``out``."""
    dev = torch.device(cfg.device)
    num = den = 0.0
    with torch.no_grad():
        for a, b in chunks(states.shape[0], cfg.batch_size):
            y = run_block(layer, read_rows(states, a, b).to(dev), config, pe).float()
            t = read_rows(targets, a, b).to(dev)
            num += float((y - t).double().pow(2).sum())
            den += float(t.double().pow(2).sum())
            if out is not None:
                out[a:b] = y.cpu().numpy()
    return (num / max(den, 1e-300)) ** 0.5


def cut_block(layer: nn.Module, accs: dict, cfg: Any, config: Any) -> list[dict]:
    """Fit each site's spectrum and reduce ``layer`` in place; one record per site."""
    from ..reduce import llama
    from ..reduce.plan import set_module
    from ..spectral import spikes

    kw = dict(estimator=cfg.estimator, margin=cfg.margin, solver=cfg.solver, seed=cfg.seed)
    records = []
    for site, acc in accs.items():
        stats = acc.finalize()
        cov, mean = stats.cov.double().cpu(), stats.mean.double().cpu()   # surgery: CPU
        n, d = stats.n, acc.dim
        mod_name = site.rsplit(":", 1)[0]
        before = n_params(layer)
        rec: dict[str, Any] = {"site": site, "d": d, "n": n}
        if cfg.mode == "width" and mod_name == "self_attn.v_proj":
            _, n_kv, hd = llama.llama_heads(layer)
            ks = ([hd] * n_kv if cfg.keep_all else llama.llama_head_ks(cov, n_kv, hd, n, **kw))
            if cfg.keep_all or sum(ks) < d:
                llama.reduce_llama_attention(layer, mean, cov, ks)
            rec.update(k=int(sum(ks)), head_ks=[int(k) for k in ks])
        elif cfg.mode == "width":
            fit = None if cfg.keep_all else spikes(cov, n, **kw)
            k = d if fit is None else max(int(fit.k), 1)
            if cfg.keep_all or k < d:
                basis = None if fit is None else torch.as_tensor(fit.eigenvectors).double()
                llama.reduce_llama_mlp(layer, mean, cov, k, surgery="select",
                                       basis=None if basis is None or basis.shape[1] < k
                                       else basis)
            rec.update(k=k)
        else:
            if cfg.keep_all:
                basis = torch.linalg.eigh(cov).eigenvectors.flip(1)
            else:
                fit = spikes(cov, n, **kw)
                basis = torch.as_tensor(fit.eigenvectors).double()[:, : max(fit.k, 1)]
            rec.update(k=int(basis.shape[1]))
            group = [m for m in (cfg.sites or LINEARS) if SHARED_INPUT.get(m, m) == mod_name]
            applied = []
            for m in group:
                old = layer.get_submodule(m)
                res = llama.project_llama_linear(layer, m, basis.float(), mean)
                if res["params_after"] < res["params_before"] or cfg.keep_all:
                    applied.append(m)
                else:   # would not save parameters
                    set_module(layer, m, old)
            rec["projected"] = applied
        rec["params_removed"] = before - n_params(layer)
        records.append(rec)
    return records


def distill_block(layer: nn.Module, states: np.memmap, targets: np.memmap,
                   cfg: Any, config: Any, pe: tuple, gen: torch.Generator) -> None:
    dev = torch.device(cfg.device)
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    layer.train()
    n = states.shape[0]
    for _ in range(cfg.distill_epochs):
        perm = torch.randperm(n, generator=gen)
        for idx in perm.split(cfg.batch_size):
            idx = np.sort(idx.numpy())
            x, t = read_rows(states, idx).to(dev), read_rows(targets, idx).to(dev)
            y = run_block(layer, x, config, pe)
            loss = (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    layer.eval()
    for p in params:
        p.requires_grad_(False)
