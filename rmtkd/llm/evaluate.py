"""Token sequences and evaluation of causal LMs: perplexity, generation speed, size."""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..report import interleaved_times, paired_medians


def token_sequences(data: Any, seq_len: int, *, max_tokens: int | None = None,
                    tokenizer: Any = None) -> torch.Tensor:
    """Calibration / evaluation tokens as a ``[N, seq_len]`` int64 tensor.

    ``data``: a ``[N, T]`` int tensor (rows kept, T must equal ``seq_len`` or is cut into
    ``seq_len`` pieces), a 1-D token stream, a list of 1-D tensors, or a list of strings
    (needs ``tokenizer``; documents are joined with its EOS token). Streams are cut into
    consecutive ``seq_len`` pieces (the remainder is dropped). ``max_tokens`` keeps the
    first ``ceil(max_tokens / seq_len)`` sequences.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        ids = data.long().reshape(-1) if data.shape[1] != seq_len else None
        seqs = data.long() if ids is None else None
    elif isinstance(data, torch.Tensor) and data.dim() == 1:
        ids, seqs = data.long(), None
    elif isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ValueError("texts need a tokenizer: the model directory has none; pass "
                             "token ids (a .pt tensor) instead")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "sep_token_id", None)
        parts: list[int] = []
        for text in data:
            parts.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                parts.append(int(eos))
        ids, seqs = torch.tensor(parts, dtype=torch.long), None
    elif isinstance(data, Sequence) and data and all(isinstance(t, torch.Tensor) for t in data):
        ids, seqs = torch.cat([t.reshape(-1).long() for t in data]), None
    else:
        raise ValueError(f"expected token ids (a tensor or list of tensors) or a list of "
                         f"strings, got {type(data).__name__}")
    if seqs is None:
        n = ids.numel() // seq_len
        seqs = ids[: n * seq_len].reshape(n, seq_len)
    if max_tokens is not None:
        seqs = seqs[: max(1, math.ceil(max_tokens / seq_len))]
    if seqs.shape[0] == 0:
        raise ValueError(f"not enough tokens for one sequence of {seq_len}; pass more text "
                         f"or a smaller seq_len")
    return seqs.contiguous()


@torch.no_grad()
def perplexity(model: nn.Module, seqs: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over all positions of ``seqs`` [N, T]."""
    model.eval()
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in seqs.split(batch_size):
        batch = batch.to(dev)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def generation_tokens_per_s(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int = 32,
                            repeats: int = 3) -> float:
    """Greedy generation speed at batch 1: ``new_tokens`` / seconds, median of ``repeats``
    (after one warm-up). ``prompt``: ``[P]`` or ``[1, P]`` token ids."""
    greedy_generation(model, prompt, new_tokens=2)()   # warm-up
    gen = {"gen": greedy_generation(model, prompt, new_tokens=new_tokens)}
    return statistics.median(new_tokens / t for t in
                             interleaved_times(gen, repeats, warmup=0)["gen"])


def greedy_generation(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int
                      ) -> Callable[[], Any]:
    """A closure generating exactly ``new_tokens`` greedy tokens after ``prompt`` (``[P]``
    or ``[1, P]`` token ids) at batch 1; the model is put in eval mode."""
    model.eval()
    ids = prompt.reshape(1, -1).to(next(model.parameters()).device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    return lambda: model.generate(ids, **kw)


def count_params(model: nn.Module) -> int:
    """Parameters, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def read_token_data(path: Any) -> Any:
    """A ``.txt`` file (one document per non-empty line) -> list of strings; a ``.pt`` file
    -> its token-id tensor (1-D stream or ``[N, T]``; a dict's ``input_ids``)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    if p.suffix == ".txt":
        docs = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
        docs = [d for d in docs if d]
        if not docs:
            raise ValueError(f"{p} holds no text (expected one document per line)")
        return docs
    if p.suffix in (".pt", ".pth"):
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj.get("input_ids")
        if not isinstance(obj, torch.Tensor) or obj.dim() not in (1, 2) or \
                obj.is_floating_point():
            raise ValueError(f"{p}: expected an int tensor of token ids, 1-D or [N, T] (or a "
                             f"dict with 'input_ids')")
        return obj.long()
    raise ValueError(f"{p}: expected a .txt file (one document per line) or a .pt tensor of "
                     f"token ids")


def split_heldout(data: Any, fraction: float = 0.1) -> tuple[Any, Any]:
    """``(calibration, held-out)``: the last ``fraction`` of the documents, rows ([N, T]) or
    tokens (1-D) are held out (at least one)."""
    n = len(data) if not isinstance(data, torch.Tensor) else data.shape[0]
    if n < 2:
        raise ValueError("need at least 2 documents (or rows) to hold some out for "
                         "evaluation; pass an evaluation file")
    cut = n - max(1, int(round(n * fraction)))
    return data[:cut], data[cut:]


def compare_models(before: nn.Module, after: nn.Module, seqs: torch.Tensor, *,
                   new_tokens: int = 32, prompt_len: int = 16, rounds: int = 15) -> dict:
    """Perplexity on ``seqs``, greedy tokens/s at batch 1 (CPU) and parameters, before and
    after. The speeds interleave (:func:`rmtkd.report.paired_medians`): ``rounds``
    alternations of one generation of each model after one warm-up, the median per model
    (a shared host's load then falls on both models alike; many short alternations track
    its drift better than a few long ones)."""
    prompt = seqs[0, :prompt_len]
    models = {"before": before, "after": after}
    out = {name: {"params": count_params(m), "perplexity": perplexity(m, seqs)}
           for name, m in models.items()}
    gens = {name: greedy_generation(m, prompt, new_tokens=new_tokens)
            for name, m in models.items()}
    with torch.no_grad():
        ms = paired_medians(gens, passes=rounds, warmup=1)
    for name in models:
        out[name]["tokens_per_s"] = new_tokens / (ms[name] / 1e3)
    return out
