"""The block-wise strategy: decoder LLMs (the Llama family of :mod:`rmtkd.adapters.llama`:
Llama, Qwen2, Mistral) compressed one decoder block at a time in bounded memory.

``compress_blockwise(model_dir, texts_or_tokens, out=DIR, config=CompressConfig(...))``:

1. the model is read tensor by tensor (``safetensors.safe_open``); the calibration tokens
   ``[N, T]`` are embedded into a memory-mapped file ``[N, T, hidden]`` in the work dir
   ``.<out>.work``; ``blockwise.heldout_tokens`` of the text after the calibration part
   (spread over it, never calibrated on) are held out for the perplexity budget, and their
   hidden states kept beside;
   With ``blockwise.residual`` the residual stream is cut first (:meth:`Blockwise.
   _residual_cut`, :mod:`rmtkd.reduce.residual`): one basis for the whole model, k by MP
   then bisected to the budget; the states are then k wide, every block is built in that
   basis, and its targets come from the original model's stream (a d-wide memmap);
2. per block i (:func:`rmtkd.engine.loop.run`): build the family's decoder layer with its
   weights; run it on the stored states -> the local teacher targets (a second memmap)
   while hooks feed one covariance accumulator per site (n = N*T tokens); fit the spectra
   and choose k (rank rule; value widths per key-value head); cut the block through the
   adapter (a site with k = 0 is skipped and recorded); distil it locally (Adam on the
   mean per-token relative squared error to the targets; undone when it does not help);
3. the budget: the held-out perplexity of the model made of the compressed blocks 0..i and
   the original blocks i+1.. must stay within ``ppl_ratio ** (P_0..i / P)`` times the
   original's (P: parameters of the blocks; the allowance grows with the share of the
   model already processed, so the budget is spread over the blocks instead of being
   spent by the first ones, and what a block leaves unused carries over to later ones).
   Each cut is distilled, then measured on the held-out slice; a cut over the block's
   allowance is cut again less deeply (``blockwise.backoff`` times: the share of the cut
   that the measured perplexity says would fit, taking log perplexity as linear in the
   share, with a 20% margin), then the block is left uncut. At the last block
   the measured perplexity is the final model's, so the final model is within the budget
   on the held-out slice. ``ppl_ratio=None`` switches the budget off; ``ppl_ratio=1`` is a
   zero budget: no lossy cut is kept;
4. the block's weights are written as one shard; its outputs become the next block's
   inputs; an atomic checkpoint (:mod:`rmtkd.checkpoint`: JSON + safetensors, with the
   size and sha256 of the shards and the current states file) is written;
5. the final norm and head are copied; optionally (``global_kl_steps > 0``) the whole
   student is distilled on the original's log-probabilities (:func:`global_kl`; loads both
   models whole; off by default) over more of the text than the calibration (never the
   budget's slice). With it the block pass may spend a looser ratio (``cut_ppl_ratio``)
   that the KL step wins back: the slice's perplexity is remeasured after each KL round,
   rounds continue while it is over ``ppl_ratio``, and the result reports the measured
   value (``within_budget`` says whether it made it). The shards are streamed into
   ``out`` in the :func:`rmtkd.load` format.

A job killed at any point (even ``kill -9``) continues with ``resume=True`` and writes the
same weights as an uninterrupted run: every block is seeded from ``(seed, block)``; the KL
step is checkpointed after each round (the student's weights, the best measured, the batch
sampler's state) and goes on from the last finished round.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import llama as family
from ..adapters.llama import EMBED, FINAL_NORM, layer_prefix
from ..checkpoint import file_entry, load_checkpoint, write_checkpoint
from ..errors import InputError
from ..hf.modeling_rmtkd import RESIDUAL_KEY
from ..files import fsync_dir
from ..llm.evaluate import token_sequences
from ..llm.hfdir import (WeightSource, build_from_shards, config_dict, shard_name,
                         write_model, write_shard)
from ..llm.states import (chunks, distill_layer, memmap, read_rows, run_states,
                          teacher_pass)
from ..ops.covariance import CovarianceStats
from ..reduce import UnsupportedModuleError, project_block_linear, reduce_site
from ..reduce.maths import n_params
from ..reduce.residual import (basis_of, quantum, residual_record, rotate_embedding,
                               rotate_head, rotate_layer_state, round_k, second_moment,
                               sliced_config)
from ..reduce.transformer import block_of, block_widths, dim_site, reads_compact_values
from .config import CompressConfig
from .loop import Strategy, Unit, run
from .step import Cut, StepRecord, attempt_k, kept_energy, reduction


@dataclass
class BlockSummary:
    """One block's view of its records: k / d per site, the relative output error after
    the cut and after distillation, parameters, seconds, status."""

    index: int
    sites: list[dict]
    error_cut: float
    error_final: float
    params_before: int
    params_after: int
    seconds: float
    status: str


@dataclass
class BlockwiseResult:
    out: Path
    history: list[StepRecord]
    params_before: int
    params_after: int
    seconds: float
    config: dict
    original_ppl: float | None = None
    final_ppl: float | None = None
    stats: dict[int, dict[str, CovarianceStats]] = field(default_factory=dict)
    #: the residual-stream cut: d, MP's k, the k cut, the perplexities tried (None: off)
    residual: dict | None = None
    #: the final KL step: steps and held-out perplexity per round, kept or not (None: off)
    global_kl: dict | None = None

    @property
    def within_budget(self) -> bool | None:
        """Whether the final held-out perplexity is within ``ppl_ratio`` (None: no budget)."""
        ratio = self.config["blockwise"]["ppl_ratio"]
        if ratio is None or self.original_ppl is None or self.final_ppl is None:
            return None
        return self.final_ppl <= ratio * self.original_ppl * (1 + 1e-9)

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    @property
    def blocks(self) -> list[BlockSummary]:
        return summarize(self.history)


def summarize(history: list[StepRecord]) -> list[BlockSummary]:
    out: dict[int, list[StepRecord]] = {}
    for r in history:
        out.setdefault(int(r.block), []).append(r)
    rows = []
    for i, recs in sorted(out.items()):
        r0 = next((r for r in recs if r.status == "applied"), recs[0])
        status = ("applied" if any(r.status == "applied" for r in recs)
                  else "rolled back" if any(r.status == "rolled back" for r in recs)
                  else "skipped")
        rows.append(BlockSummary(i, [r.to_dict() for r in recs],
                                 r0.error_cut if r0.error_cut is not None else 0.0,
                                 r0.error_final if r0.error_final is not None else 0.0,
                                 r0.params_before, r0.params_after, r0.seconds, status))
    return rows


def work_dir(out: Path) -> Path:
    """Where the job keeps its states, shards and checkpoint: ``.<out>.work`` beside out."""
    return out.parent / f".{out.name}.work"


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model directory, or None when it has none."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


PROJECT_GROUPS = {"q": ("k", "v"), "gate": ("up",)}   # Linears that read the same input


class Blockwise(Strategy):
    desc, unit_name = "blocks", "block"

    def __init__(self, src: WeightSource, seqs: torch.Tensor, held: torch.Tensor | None,
                 out: Path, cfg: CompressConfig, resume: bool,
                 kl_seqs: torch.Tensor | None = None) -> None:
        self.cfg, self.b = cfg, cfg.blockwise
        self.src, self.config = src, src.config
        self.progress, self.keep_all = cfg.progress, self.b.keep_all
        self.backoff = self.b.backoff if self.budgeted else 0
        self.seqs, self.held, self.kl_seqs = seqs, held, kl_seqs
        self.out, self.work = out, work_dir(out)
        self.dev = torch.device(self.b.device)
        L = self.config.num_hidden_layers
        self.units = [Unit(i, f"block {i}", [], block=i) for i in range(L)]
        self.total = L + 2
        self.history: list[StepRecord] = []
        self.gen = torch.Generator()
        self.stats_out: dict[int, dict[str, CovarianceStats]] = {}
        self.resuming = resume
        self.pe = family.position_embeddings(self.config, seqs.shape[1], self.dev)
        self.state: dict = {}
        self._norm_head: tuple[nn.Module, torch.Tensor] | None = None
        #: the residual stream's basis (d x k) when it is cut, and the k-wide config
        self.rot: torch.Tensor | None = None
        self.config_k = self.config
        self.orig_files: dict = {}
        #: the global KL step's sampler state after its last checkpointed round
        self.kl_gen: torch.Tensor | None = None

    @property
    def budgeted(self) -> bool:
        return self.b.ppl_ratio is not None and not self.b.keep_all

    @property
    def cut_ratio(self) -> float:
        """The perplexity ratio the block pass may reach: ``cut_ppl_ratio`` when a KL step
        follows to win the difference back, else the budget itself."""
        b = self.b
        return float(b.ppl_ratio if b.cut_ppl_ratio is None else b.cut_ppl_ratio)

    # -------------------------------------------------------------- files / checkpoint
    def _fingerprint(self) -> str:
        """sha256 of the weights (their files, or the in-memory state dict), config, data
        and settings: a work dir resumes only the job that wrote it."""
        from ..files import hash_file

        h = hashlib.sha256()
        h.update(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        if self.src.path is not None:
            for f in self.src.weight_files():
                h.update(f"{f.name}:{hash_file(f)}".encode())
        else:
            for name in self.src.names():
                t = self.src.get(name)
                h.update(name.encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for t in (self.seqs, self.held, self.kl_seqs):
            if t is not None:
                h.update(t.numpy().tobytes())
        h.update(json.dumps(self.cfg.fingerprint_dict(), sort_keys=True,
                            default=str).encode())
        return h.hexdigest()

    def _track(self, rel: str, drop: str | None = None) -> None:
        files = self.state.setdefault("files", {})
        files[rel] = file_entry(self.work / rel)
        if drop is not None:
            files.pop(drop, None)

    def checkpoint(self, next_index: int, finished: bool) -> None:
        self.state.update(next_block=next_index,
                          history=[r.to_dict() for r in self.history])
        tensors = {} if self.held_states is None else {"held": self.held_states}
        if self.rot is not None:
            tensors["residual_basis"] = self.rot
        if self.kl_gen is not None:
            tensors["kl_generator"] = self.kl_gen
        write_checkpoint(self.work / "ckpt", self.state, tensors, step=next_index,
                         external={f"../{k}": v for k, v in self.state["files"].items()})

    # -------------------------------------------------------------- global KL rounds
    def kl_saved(self) -> dict | None:
        """The global KL step as its last finished round left it (None: not started):
        ``global_kl``'s ``resume`` argument."""
        saved = self.state.get("kl_progress")
        if saved is None:
            return None
        from safetensors.torch import load_file

        student = load_file(str(self.work / saved["student"]))
        best = student if saved["best"] == saved["student"] else (
            None if saved["best"] is None else load_file(str(self.work / saved["best"])))
        return {**saved, "student": student, "best": best, "generator": self.kl_gen}

    def kl_round_done(self, snap: dict) -> None:
        """Checkpoint one finished KL round (``global_kl``'s ``on_round``): the student's
        weights, the best measured (when they differ), the record and the sampler state.
        Each round's files have names of their own: the last checkpoint's stay intact
        until the new checkpoint no longer needs them."""
        r, old = snap["round"], self.state.get("kl_progress") or {}
        files = {"student": f"kl-student-{r}.safetensors", "best": None}
        write_shard(self.work / files["student"], snap["student"])
        self._track(files["student"])
        if snap["best"] is snap["student"]:
            files["best"] = files["student"]
        elif snap["best"] is not None:
            files["best"] = f"kl-best-{r}.safetensors"
            write_shard(self.work / files["best"], snap["best"])
            self._track(files["best"])
        stale = {old.get("student"), old.get("best")} - set(files.values()) - {None}
        for rel in stale:
            self.state["files"].pop(rel, None)
        self.kl_gen = snap["generator"]
        self.state["kl_progress"] = {"round": r, "rec": snap["rec"],
                                     "best_ppl": snap["best_ppl"], **files}
        self.checkpoint(self.state["next_block"], False)
        for rel in stale:
            (self.work / rel).unlink(missing_ok=True)

    def resume(self) -> int:
        b, work = self.b, self.work
        model_dir = work / "model"
        N, T = self.seqs.shape
        d = self.config.hidden_size
        fp = self._fingerprint()
        got = None
        if self.resuming and (work / "ckpt").is_dir():
            if not model_dir.is_dir():
                raise InputError(f"cannot resume: {work} has a checkpoint but no model shards "
                                 f"(the job had finished? see {self.out}); drop --resume "
                                 f"to rerun")
            got = load_checkpoint(work / "ckpt")
            if got is not None and got[0].get("fingerprint") != fp:
                raise InputError(f"cannot resume: the work dir {work} belongs to a job with "
                                 f"other arguments (model, data or settings); drop --resume "
                                 f"to start afresh")
        if got is None and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        model_dir.mkdir(exist_ok=True)
        fresh = got is None
        if got is not None:
            self.state, tensors = got
            self._set_basis(tensors.get("residual_basis"))
            self.kl_gen = tensors.get("kl_generator")
        else:
            self.state = {"fingerprint": fp, "next_block": 0, "current": "a", "widths": [],
                          "kl_done": False, "seconds": 0.0, "history": [],
                          "block_params": self._block_params(), "files": {}}
            if b.residual and not b.keep_all:
                self._set_basis(self._residual_cut())
        shape = (N, T, self.config_k.hidden_size)
        self.files = {k: memmap(work / f"states-{k}.f32", shape, fresh) for k in ("a", "b")}
        self.targets = memmap(work / "targets.f32", shape, fresh)
        if self.rot is not None:
            self.orig_files = {k: memmap(work / f"orig-{k}.f32", (N, T, d),
                                         fresh and k == "b") for k in ("a", "b")}
        if got is not None:
            self.history = [StepRecord.from_dict(d) for d in self.state["history"]]
            self.held_states = tensors.get("held")
            return self.state["next_block"]
        emb = self.src.get(EMBED)
        if self.rot is not None:   # the original stream beside the cut one (the targets)
            self._embed(self.orig_files["a"], emb)
            self.state["orig_current"] = "a"
            self._track("orig-a.f32")
            emb = rotate_embedding(emb, self.rot)
        self._embed(self.files["a"], emb)
        self.held_states = None if self.held is None else \
            nn.functional.embedding(self.held, emb).float()
        write_shard(model_dir / shard_name(1, self.total), {EMBED: emb})
        del emb
        self._track(f"model/{shard_name(1, self.total)}")
        self._track("states-a.f32")
        if self.budgeted and "original_ppl" not in self.state:
            self.state["original_ppl"] = self.state["current_ppl"] = \
                self._heldout_ppl(None, -1, self.held_states)
        self.checkpoint(0, False)
        return 0

    def _embed(self, mm: Any, emb: torch.Tensor) -> None:
        for a, c in chunks(mm.shape[0], self.b.batch_size):
            mm[a:c] = nn.functional.embedding(self.seqs[a:c], emb).float().numpy()
        mm.flush()

    def _set_basis(self, basis: torch.Tensor | None) -> None:
        self.rot = None if basis is None else basis.float()
        self.config_k = self.config if basis is None else \
            sliced_config(self.config, int(basis.shape[1]))
        self._norm_head = None

    # -------------------------------------------------------------- the residual stream
    def _residual_cut(self) -> torch.Tensor | None:
        """Choose the residual stream's basis before the blocks (the residual-first
        schedule): run the original model over the calibration states (in the work dir's
        ``orig-*`` files) pooling the second moment of every norm's RMS-normalised input
        (both norms of every block and the final norm); its MP spikes give MP's k (n = the
        calibration tokens). Without a budget that k is cut. With one, the cut-only model
        (every block rotated and sliced, nothing distilled) is measured on the held-out
        slice and k bisected, starting at MP's k, to the smallest multiple of
        :func:`~rmtkd.reduce.residual.quantum` whose perplexity is within
        ``ppl_ratio ** residual_share`` of the original (the blocks' local distillation then
        wins part of it back for the inner cuts). Returns the basis (d x k), or None when
        k = d (nothing is rotated: the job is the uncut one)."""
        from tqdm.auto import tqdm

        from ..spectral import spikes

        t0 = time.perf_counter()
        b, cfg = self.b, self.cfg
        N, T = self.seqs.shape
        d, L = self.config.hidden_size, self.config.num_hidden_layers
        files = {k: memmap(self.work / f"orig-{k}.f32", (N, T, d), True) for k in ("a", "b")}
        emb = self.src.get(EMBED)
        self._embed(files["a"], emb)
        held = None if self.held is None else nn.functional.embedding(self.held, emb).float()
        moment = torch.zeros(d, d, dtype=torch.float64)
        reads = [0]

        def feed(_m: Any, args: tuple) -> None:
            m, n = second_moment(args[0].detach().cpu())
            moment.add_(m)
            reads[0] += n

        cur = "a"
        for j in tqdm(range(L), desc="residual stream", unit="block",
                      disable=not self.progress):
            layer = self._orig_layer(j)
            hooks = [layer.get_submodule(n.name).register_forward_pre_hook(feed)
                     for n in family.LAYOUT.norms]
            nxt = "b" if cur == "a" else "a"
            try:
                run_states(layer, self._run(j), files[cur], batch_size=b.batch_size,
                           device=self.dev, out=files[nxt])
            finally:
                for h in hooks:
                    h.remove()
            if held is not None:
                held = _run_all(layer, self._run(j), held, b.batch_size, self.dev).cpu()
            cur = nxt
        for a, c in chunks(N, b.batch_size):
            m, n = second_moment(read_rows(files[cur], a, c))
            moment.add_(m)
            reads[0] += n
        for mm in files.values():
            mm._mmap.close()   # noqa: SLF001 -- reopened for the blocks
        vals, vecs = basis_of(moment / reads[0])
        fit = spikes(moment / reads[0], N * T, estimator=cfg.estimator, margin=cfg.margin,
                     solver="full")
        mp_k, step = int(fit.k), quantum(self.config)
        tried: dict[int, float] = {}
        rec = {"d": d, "mp_k": mp_k, "tokens": N * T, "tried": []}
        if self.budgeted:
            orig = self._ppl(held, *self._norm_head_for(None))
            self.state["original_ppl"] = orig
            target = orig * self.cut_ratio ** b.residual_share
            rec.update(original_ppl=orig, target_ppl=target)

            def fits(k: int) -> bool:
                q = vecs[:, :k].float()
                h = nn.functional.embedding(self.held, rotate_embedding(emb, q)).float()
                ck = sliced_config(self.config, k)
                for j in range(L):
                    h = _run_all(self._sliced_layer(j, q, ck), self._run(j), h,
                                 b.batch_size, self.dev)
                tried[k] = self._ppl(h, *self._norm_head_for(q, ck))
                rec["tried"].append([k, tried[k]])
                return tried[k] <= target

            lo, hi = 0, d   # largest k known to break the target, smallest known to hold
            k0 = round_k(max(mp_k, 1), d, step)
            if float(b.ppl_ratio) > 1.0 and k0 < d:
                if fits(k0):
                    hi = k0
                else:
                    lo = k0
                while hi - lo > step and len(tried) < 8:
                    mid = round_k((lo + hi) // 2, d, step)
                    if mid >= hi:
                        mid = hi - step
                    if mid <= lo:
                        break
                    if fits(mid):
                        hi = mid
                    else:
                        lo = mid
            k = hi
            self.state["current_ppl"] = tried.get(k, orig)
            self.state["start_ratio"] = self.state["current_ppl"] / orig
        else:
            k = d if b.ppl_ratio == 1.0 else round_k(max(mp_k, 1), d, step)
        rec.update(k=k, ppl=tried.get(k), seconds=time.perf_counter() - t0,
                   eigenvalues=vals[: min(d, 64)].tolist())
        self.state["residual"] = rec
        return None if k >= d else vecs[:, :k].float().contiguous()


    def _block_params(self) -> list[int]:
        out = []
        for i in range(self.config.num_hidden_layers):
            names = [n for n in self.src.names() if n.startswith(layer_prefix(i))]
            out.append(sum(self.src.numel(n) for n in names))
        return out

    # -------------------------------------------------------------- layers
    def _layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` as the job starts it: its original weights, in the residual
        basis when the stream is cut; fp32 on the device."""
        if self.rot is None:
            return self._orig_layer(i)
        return self._sliced_layer(i, self.rot, self.config_k)

    def _orig_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its original weights, fp32 on the device."""
        layer = family.new_layer(self.config, i)
        layer.to_empty(device=self.dev)
        layer.load_state_dict({k: v.float() for k, v in
                               self.src.prefixed(layer_prefix(i)).items()}, strict=True)
        return layer.float().eval()

    def _sliced_layer(self, i: int, basis: torch.Tensor, config_k: Any) -> nn.Module:
        """Decoder layer ``i`` with its residual stream in ``basis`` (d x k)."""
        state = {k: v.float() for k, v in self.src.prefixed(layer_prefix(i)).items()}
        state = rotate_layer_state(state, family.LAYOUT, basis, self.config.hidden_size)
        layer = family.new_layer(config_k, i)
        layer.to_empty(device=self.dev)
        layer.load_state_dict(state, strict=True)
        return layer.float().eval()

    def _run(self, i: int):
        return partial(_run_layer, config=self.config, index=i, pe=self.pe)

    @torch.no_grad()
    def _heldout_ppl(self, layer: nn.Module | None, i: int, states: torch.Tensor) -> float:
        """Held-out perplexity of the compressed blocks 0..i-1 (their outputs: ``states``,
        entering block i), ``layer`` as block i (skipped when None) and the original
        blocks after it, then the final norm and head."""
        b = self.b
        h = states
        if layer is not None:
            h = _run_all(layer, self._run(i), h, b.batch_size, self.dev)
        for j in range(i + 1, self.config.num_hidden_layers):
            h = _run_all(self._layer(j), self._run(j), h, b.batch_size, self.dev)
        return self._ppl(h, *self._head())

    @torch.no_grad()
    def _ppl(self, h: torch.Tensor, norm: nn.Module, head: torch.Tensor) -> float:
        """Perplexity of the held-out tokens from the last block's outputs ``h``."""
        nll, count = 0.0, 0
        for a, c in chunks(h.shape[0], max(1, self.b.batch_size // 2)):
            logits = norm(h[a:c].to(self.dev)) @ head.T
            ids = self.held[a:c].to(self.dev)
            nll += float(nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="sum"))
            count += ids[:, 1:].numel()
        return math.exp(nll / count)

    def _head(self) -> tuple[nn.Module, torch.Tensor]:
        """The final norm and the head (fp32, on the device, in the residual basis when
        the stream is cut), made once per job."""
        if self._norm_head is None:
            self._norm_head = self._norm_head_for(self.rot, self.config_k)
        return self._norm_head

    def _norm_head_for(self, basis: torch.Tensor | None, config_k: Any = None
                       ) -> tuple[nn.Module, torch.Tensor]:
        g = self.src.get(FINAL_NORM).float()
        if basis is None:
            return (family.final_norm(self.config, g).to(self.dev),
                    self.src.lm_head().float().to(self.dev))
        tied = self.src.tied()
        new = rotate_head(g, None if tied else self.src.lm_head().float(), basis,
                          self.config.hidden_size)
        if tied:
            from ..hf.modeling_rmtkd import MixedRMSNorm

            norm = MixedRMSNorm(basis.shape[1], config_k.rms_norm_eps)
            with torch.no_grad():
                norm.weight.copy_(new["norm"])
                norm.mix.copy_(new["mix"])
            head = rotate_embedding(self.src.get(EMBED).float(), basis)
        else:
            norm, head = family.final_norm(config_k, new["norm"]), new["head"]
        return norm.to(self.dev).eval(), head.to(self.dev)

    def _allowance(self, i: int) -> float:
        """The perplexity ratio blocks 0..i may spend: from ``r0`` (the ratio the job
        starts from: 1, or the residual cut's) to the pass's ratio R (:attr:`cut_ratio`)
        geometrically with the share s of the block parameters in blocks 0..i:
        ``r0 (R / r0) ** s``."""
        p = self.state["block_params"]
        r0 = float(self.state.get("start_ratio", 1.0))
        return r0 * (self.cut_ratio / r0) ** (sum(p[: i + 1]) / max(sum(p), 1))

    # -------------------------------------------------------------- the step
    def generators(self) -> tuple:
        return (self.gen,)

    def prepare(self, unit: Unit) -> None:
        i = unit.index
        self.t0 = time.perf_counter()
        self.orig = self._layer(i)
        self.layer = self.orig
        ad, spec = block_of(self.orig)
        if self.cfg.mode == "width":
            dims = ad.coupled_dims(self.orig)
            sites = [dim_site(d, self.orig) for d in dims]
            kv = {dim_site(d, self.orig).name: d.block.attention.kv_heads for d in dims
                  if d.kind == "value_width"}
            one = set(kv) if reads_compact_values(self.orig, spec) else set()
        else:
            a, m = spec.attention, spec.mlp
            readers = [a.q, a.o, m.producers[0], m.consumer]
            sites = [_linear_site(self.orig, n) for n in readers]
            kv, one = {}, set()
        if self.cfg.sites:
            from fnmatch import fnmatchcase

            sites = [s for s in sites if any(fnmatchcase(s.module_name, p)
                                             for p in self.cfg.sites)]
        unit.sites, unit.kv_heads, unit.one_width = sites, kv, one
        self.spec = spec
        cur = self.state["current"]
        # with the residual stream cut the targets come from the original stream instead
        self.accs = teacher_pass(self.orig, self._run(i), self.files[cur],
                                 None if self.rot is not None else self.targets,
                                 batch_size=self.b.batch_size, device=self.dev,
                                 sites={s.name: (s.module_name, s.where) for s in sites},
                                 acc_dtype=getattr(torch, self.cfg.acc_dtype))
        if self.rot is not None:
            self._original_targets(i)
        self.targets.flush()
        self.params_before = n_params(self.orig)
        self.ppl, self.next_ready = math.nan, False
        self.index, self.tried = i, []   # (share, log perplexity ratio) per attempt

    def _original_targets(self, i: int) -> None:
        """With the residual stream cut, the targets are the original model's: original
        block i on the original stream (advanced in ``orig-*``), in the residual basis."""
        cur = self.state["orig_current"]
        nxt = "b" if cur == "a" else "a"
        run_states(self._orig_layer(i), self._run(i), self.orig_files[cur],
                   batch_size=self.b.batch_size, device=self.dev, out=self.orig_files[nxt])
        self.orig_files[nxt].flush()
        for a, c in chunks(self.targets.shape[0], self.b.batch_size):
            self.targets[a:c] = (read_rows(self.orig_files[nxt], a, c) @ self.rot).numpy()

    def calibrate(self, unit: Unit) -> dict:
        out = {}
        for s in unit.sites:
            st = self.accs[s.name].finalize()
            st = CovarianceStats(st.n, st.mean.double().cpu(), st.cov.double().cpu())
            out[s.name] = (st, st.n)
        if self.b.keep_stats:
            self.stats_out[unit.index] = {n: v[0] for n, v in out.items()}
        del self.accs
        return out

    def metric(self) -> float:
        return float(self.state.get("current_ppl", math.nan))

    def params(self) -> int:
        return n_params(self.orig)

    def _share(self, attempt: int) -> float | None:
        """The share of each site's cut made at ``attempt``: all of it first; then, from the
        perplexity the last attempt measured, the share that would spend what the block may
        (log-perplexity taken as linear in the share, with a 20% margin); None when no
        useful cut is left. (Sizing the first cut from the previous block's measured cost
        was tried: fewer attempts, but smaller cuts, BENCHMARKS.md.)"""
        if attempt == 0:
            return 1.0
        share, log_ratio = self.tried[-1]
        allowed = math.log(self._allowance(self.index) * self.state["original_ppl"]
                           / self.state["current_ppl"])
        if allowed <= 0 or log_ratio <= 0:
            return None
        new = min(0.75 * share, 0.8 * share * allowed / log_ratio)
        return new if new >= 0.05 else None

    def cut(self, unit: Unit, cuts: list[Cut], recs: list[StepRecord], attempt: int
            ) -> bool:
        if self.budgeted and float(self.b.ppl_ratio) <= 1.0:
            for r in recs:
                r.status, r.reason = "skipped", ("zero budget (ppl_ratio = 1): no lossy cut "
                                                 "is kept")
            return False
        share = self._share(attempt)
        if share is None:
            for r in recs:
                r.reason += "; no smaller cut fits in what is left of the budget"
            return False
        self.layer = copy.deepcopy(self.orig)
        applied = False
        for cut, rec in zip(cuts, recs):
            rec.attempt, rec.share = attempt, share
            rec.k, rec.head_ks = attempt_k(cut, share)
            rec.energy = kept_energy(cut, rec.k, rec.head_ks) if rec.k > 0 else 0.0
            why = self._cut_site(cut, rec, share)
            note = f"attempt {attempt} (share {share:.2f} of the cut): " if attempt else ""
            if why is None:
                rec.status = "applied"
                applied = True
            elif rec.status != "rolled back":   # a back-off that cuts nothing stays so
                rec.status = "skipped"
            rec.reason = (rec.reason + "; " if rec.reason else "") + note + (
                why or f"cut {rec.d} -> {rec.k}")
        if not applied:
            self.layer = self.orig
            return False
        self.share = share
        self.err_cut = run_states(self.layer, self._run(unit.index),
                                  self.files[self.state["current"]], targets=self.targets,
                                  batch_size=self.b.batch_size, device=self.dev)
        for r in recs:
            r.error_cut = r.error_final = self.err_cut
        return True

    def _cut_site(self, cut: Cut, rec: StepRecord, share: float) -> str | None:
        """Cut one site of ``self.layer``; None when applied, else why not."""
        if rec.k < 1:
            return "no spike above the threshold (k = 0): the site is left as is"
        if rec.k >= rec.d and not self.keep_all:
            return f"k = d = {rec.d}: nothing to cut"
        try:
            if self.cfg.mode == "width":
                red = reduction(cut, self.cfg, share)
                res = reduce_site(self.layer, red, force=self.keep_all)
                return None if res.applied else res.reason
            return self._project(cut, rec.k)
        except (UnsupportedModuleError, ValueError) as e:
            return f"not cut: {e}"

    def _project(self, cut: Cut, k: int) -> str | None:
        basis = cut.eigh()[1][:, :k]
        name = cut.site.module_name
        prefix, _, leaf = name.rpartition(".")
        key = leaf.removesuffix("_proj")
        group = [name] + [f"{prefix}.{g}_proj" if prefix else f"{g}_proj"
                          for g in PROJECT_GROUPS.get(key, ())]
        if self.cfg.sites:
            from fnmatch import fnmatchcase

            group = [g for g in group if any(fnmatchcase(g, p) for p in self.cfg.sites)]
        done = []
        for g in group:
            old = self.layer.get_submodule(g)
            res = project_block_linear(self.layer, g, basis.float(), cut.stats.mean)
            if res["params_after"] < res["params_before"] or self.keep_all:
                done.append(g)
            else:
                from ..reduce.maths import set_module

                set_module(self.layer, g, old)
        return None if done else f"project at k={k} would not reduce parameters"

    def _over_budget(self, ppl: float) -> str | None:
        allowed = self._allowance(self.index)
        got = ppl / self.state["original_ppl"]
        if got > allowed:
            return (f"held-out perplexity {ppl:.3f} is {got:.4f}x the original "
                    f"{self.state['original_ppl']:.3f}; blocks 0..{self.index} may spend "
                    f"{allowed:.4f}x of the pass's ratio {self.cut_ratio}")
        return None

    def distil(self, unit: Unit, recs: list[StepRecord]) -> str | None:
        self.next_ready = False
        if self.cfg.distill_epochs <= 0 or self.keep_all:
            return None
        run_fn, cur = self._run(unit.index), self.files[self.state["current"]]
        saved = {k: v.clone() for k, v in self.layer.state_dict().items()}
        distill_layer(self.layer, run_fn, cur, self.targets, batch_size=self.b.batch_size,
                      device=self.dev, epochs=self.cfg.distill_epochs, lr=self.cfg.lr,
                      gen=self.gen)
        # The distilled layer's outputs go straight into the next block's inputs: finish
        # reuses them when this layer is kept (and its weights are stored unrounded).
        nxt = self.files[self._next()]
        err = run_states(self.layer, run_fn, cur, targets=self.targets,
                         batch_size=self.b.batch_size, device=self.dev, out=nxt)
        if not err < self.err_cut:   # distillation did not help: keep the plain cut
            self.layer.load_state_dict(saved)
            err = self.err_cut
        else:
            self.next_ready = self.src.dtype() == torch.float32
        for r in recs:
            r.error_final = err
        return None

    def judge(self, unit: Unit, recs: list[StepRecord]) -> str | None:
        """The held-out perplexity of the distilled cut against the block's allowance
        (measured once per attempt, after distillation: a cut that distillation brings
        within the allowance is kept; one it does not is cut again less deeply)."""
        if not self.budgeted:
            return None
        self.ppl = self._heldout_ppl(self.layer, unit.index, self.held_states)
        self.tried.append((self.share, math.log(self.ppl / self.state["current_ppl"])))
        for r in recs:
            r.metric_reduced = r.metric_after = self.ppl
        return self._over_budget(self.ppl)

    def accept(self, unit: Unit, recs: list[StepRecord]) -> None:
        if not math.isnan(self.ppl):
            self.state["current_ppl"] = self.ppl

    def rollback(self, unit: Unit, recs: list[StepRecord]) -> None:
        self.layer, self.next_ready = self.orig, False

    def _recover(self, i: int) -> bool:
        """An uncut block of a job whose residual stream is cut still lost what the slice
        dropped: distil it locally to the original model's outputs (kept when it lowers
        the error and, with a budget, does not raise the held-out perplexity: measured,
        the recovery of SmolLM2's last block raised it). True when kept."""
        if self.cfg.distill_epochs <= 0:
            return False
        run_fn, cur = self._run(i), self.files[self.state["current"]]
        before = run_states(self.orig, run_fn, cur, targets=self.targets,
                            batch_size=self.b.batch_size, device=self.dev)
        layer = copy.deepcopy(self.orig)
        distill_layer(layer, run_fn, cur, self.targets, batch_size=self.b.batch_size,
                      device=self.dev, epochs=self.cfg.distill_epochs, lr=self.cfg.lr,
                      gen=self.gen)
        after = run_states(layer, run_fn, cur, targets=self.targets,
                           batch_size=self.b.batch_size, device=self.dev)
        if not after < before:
            return False
        if self.budgeted:   # kept only when the held-out perplexity does not rise
            ppl = self._heldout_ppl(layer, i, self.held_states)
            if not ppl <= self.state["current_ppl"]:
                return False
            self.state["current_ppl"] = ppl
        self.layer, self.next_ready = layer, False
        return True

    def _next(self) -> str:
        return "b" if self.state["current"] == "a" else "a"

    def finish(self, unit: Unit, recs: list[StepRecord]) -> None:
        i, b = unit.index, self.b
        cur, nxt = self.state["current"], self._next()
        if self.layer is self.orig and self.rot is not None:
            self._recover(i)
        layer = self.layer
        dtype = self.src.dtype()
        stored = {k: v.to(dtype) for k, v in layer.state_dict().items()}
        model_dir = self.work / "model"
        write_shard(model_dir / shard_name(i + 2, self.total),
                    {layer_prefix(i) + k: v for k, v in stored.items()})
        # Next inputs: the outputs of the weights as stored (rounded to the model's dtype).
        layer.load_state_dict({k: v.float() for k, v in stored.items()})
        del stored
        run_fn = self._run(i)
        if layer is self.orig and self.rot is None:
            # uncut: its outputs are the teacher targets, bit for bit
            for a, c in chunks(self.targets.shape[0], b.batch_size):
                self.files[nxt][a:c] = self.targets[a:c]
        elif not self.next_ready:   # (else written by distil from these very weights)
            run_states(layer, run_fn, self.files[cur], batch_size=b.batch_size,
                       device=self.dev, out=self.files[nxt])
        self.files[nxt].flush()
        if self.held_states is not None:
            self.held_states = _run_all(layer, run_fn, self.held_states, b.batch_size,
                                        self.dev).cpu()
        if self.rot is not None:
            ocur = self.state["orig_current"]
            onxt = "b" if ocur == "a" else "a"
            self._track(f"orig-{onxt}.f32", drop=f"orig-{ocur}.f32")
            self.state["orig_current"] = onxt
        after = n_params(layer)
        seconds = time.perf_counter() - self.t0
        for r in recs:
            r.params_before, r.params_after = self.params_before, after
            if r.status != "applied" and r.error_cut is None:
                r.error_cut = r.error_final = 0.0
            if r.status == "rolled back":
                r.error_final = 0.0
            r.seconds = seconds
        self._track(f"model/{shard_name(i + 2, self.total)}")
        self._track(f"states-{nxt}.f32", drop=f"states-{cur}.f32")
        self.state["widths"].append(block_widths(layer, self.spec))
        self.state.update(current=nxt, seconds=self.state["seconds"] + seconds)
        del self.orig, self.layer


def _run_layer(layer: nn.Module, x: torch.Tensor, *, config: Any, index: int, pe: tuple
               ) -> torch.Tensor:
    return family.run_layer(layer, x, config, index, pe)


@torch.no_grad()
def _run_all(layer: nn.Module, run_fn: Any, h: torch.Tensor, batch_size: int,
             device: Any) -> torch.Tensor:
    return torch.cat([run_fn(layer, h[a:c].to(device)).float()
                      for a, c in chunks(h.shape[0], batch_size)])


def _linear_site(layer: nn.Module, name: str):
    from ..capture import make_site

    return make_site(name, layer.get_submodule(name), "input")


# ----------------------------------------------------------------------------- driver

def split_rows(n: int, cfg: CompressConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row indices ``(calibration, held-out)`` of ``n`` sequences. Calibration: the first
    ``ceil(calib_tokens / seq_len)``. Held out (with a budget): ``ceil(heldout_tokens /
    seq_len)`` sequences spread evenly over the rest of the text, so the budget sees every
    part of it rather than its last document; when the text is too short for both, the
    last sequences are held out and calibration gets what precedes them."""
    b = cfg.blockwise
    n_cal = min(n, math.ceil(b.calib_tokens / b.seq_len))
    if b.ppl_ratio is None or b.keep_all:
        return torch.arange(n_cal), None
    n_held = max(1, math.ceil(b.heldout_tokens / b.seq_len))
    if n <= n_held:
        raise InputError(f"the text gives {n} sequences of {b.seq_len} tokens; "
                         f"the perplexity budget holds out {n_held} of them "
                         f"(heldout_tokens={b.heldout_tokens}): pass more text, or a smaller "
                         f"heldout_tokens, or no budget (ppl_ratio=None)")
    if n - n_cal < n_held:
        return torch.arange(n - n_held), torch.arange(n - n_held, n)
    rest = n - n_cal
    idx = ((torch.arange(n_held, dtype=torch.float64) + 0.5) * rest / n_held).long()
    return torch.arange(n_cal), n_cal + idx


def split_tokens(seqs: torch.Tensor, cfg: CompressConfig) -> tuple[torch.Tensor,
                                                                   torch.Tensor | None]:
    """``(calibration, held-out)`` sequences of ``seqs`` (:func:`split_rows`)."""
    cal, held = split_rows(seqs.shape[0], cfg)
    return seqs[cal], None if held is None else seqs[held]


def kl_sequences(seqs: torch.Tensor, cfg: CompressConfig) -> torch.Tensor:
    """The final KL step's data: the calibration sequences, then the text after them in
    order, never a held-out row; ``ceil(kl_tokens / seq_len)`` sequences at most (never
    fewer than the calibration)."""
    b = cfg.blockwise
    cal, held = split_rows(seqs.shape[0], cfg)
    taken = torch.zeros(seqs.shape[0], dtype=torch.bool)
    taken[cal] = True
    if held is not None:
        taken[held] = True
    rows = torch.cat([cal, torch.nonzero(~taken).flatten()])
    return seqs[rows[: max(len(cal), math.ceil(b.kl_tokens / b.seq_len))]]


def compress_blockwise(model: Any, data: Any, *, out: str | os.PathLike,
                       config: CompressConfig | None = None, resume: bool = False,
                       overwrite: bool = False, tokenizer: Any = None) -> BlockwiseResult:
    """Compress a decoder LM of the Llama family block by block; write it to ``out``.

    Args:
        model: a Hugging Face model directory (config.json + safetensors; read tensor by
            tensor) or an in-memory causal LM (LlamaForCausalLM, Qwen2ForCausalLM,
            MistralForCausalLM).
        data: calibration text or tokens (see :func:`rmtkd.llm.token_sequences`): a
            ``[N, T]`` or 1-D int tensor, a list of them, or a list of strings (tokenized
            with ``tokenizer``, default: the model directory's). With a budget, the last
            ``blockwise.heldout_tokens`` are held out for it.
        out: output directory (the :func:`rmtkd.load` format; written at the end).
        config: the settings (:class:`CompressConfig`, ``blockwise`` nested).
        resume: continue the job whose work dir ``.<out>.work`` exists (same arguments).
        overwrite: replace an existing ``out``.

    Returns:
        :class:`BlockwiseResult` (records per site and block, parameter counts, held-out
        perplexity before and after when budgeted; ``stats`` with ``keep_stats``).
    """
    cfg = (config or CompressConfig()).resolved("blockwise")
    cfg.validate()
    b = cfg.blockwise
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--force) to "
                              f"replace it")
    src = WeightSource.from_model(model) if isinstance(model, nn.Module) else \
        WeightSource.from_dir(model)
    if tokenizer is None and src.path is not None and isinstance(data, (list, tuple)) and \
            data and isinstance(data[0], str):
        tokenizer = load_tokenizer(src.path)
    budgeted = b.ppl_ratio is not None and not b.keep_all
    seqs = token_sequences(data, b.seq_len, tokenizer=tokenizer, max_tokens=None if budgeted
                           else max(b.calib_tokens, b.kl_tokens if b.global_kl_steps else 0))
    vocab = src.config.vocab_size
    if int(seqs.max()) >= vocab or int(seqs.min()) < 0:
        raise InputError(f"token ids must lie in [0, {vocab}) (the model's vocab_size); got "
                         f"[{int(seqs.min())}, {int(seqs.max())}]")
    calib, held = split_tokens(seqs, cfg)
    kl = kl_sequences(seqs, cfg) if b.global_kl_steps > 0 else None
    s = Blockwise(src, calib, held, out, cfg, resume, kl)
    run(s)
    return _assemble(s, out)


def _assemble(s: Blockwise, out: Path) -> BlockwiseResult:
    """Final norm and head, the optional global KL step, the output directory."""
    t_tail = time.perf_counter()
    cfg, b, src, work, state = s.cfg, s.b, s.src, s.work, s.state
    total = s.total
    head = {FINAL_NORM: src.get(FINAL_NORM)}
    tied = src.tied()
    if not tied:
        head[family.LM_HEAD] = src.lm_head()
    overrides = {}
    if s.rot is not None:   # the final norm and head in the residual basis
        d, k = src.config.hidden_size, s.config_k.hidden_size
        new = rotate_head(head[FINAL_NORM].float(), None if tied else head[family.LM_HEAD].float(),
                          s.rot, d)
        dtype = src.dtype()
        head = {FINAL_NORM: new["norm"].to(dtype)}
        if tied:
            head[FINAL_NORM.removesuffix("weight") + "mix"] = new["mix"].to(dtype)
        else:
            head[family.LM_HEAD] = new["head"].to(dtype)
        ck = s.config_k
        overrides = {"hidden_size": k, "head_dim": ck.head_dim, "rms_norm_eps": ck.rms_norm_eps,
                     RESIDUAL_KEY: residual_record(d, k, tied)}
    model_dir = work / "model"
    write_shard(model_dir / shard_name(total, total), head)
    del head
    for mm in (*s.files.values(), s.targets):
        mm._mmap.close()   # noqa: SLF001 -- the states are no longer needed
    shards = [shard_name(j, total) for j in range(1, total + 1)]
    cfg_json = config_dict(src, state["widths"], src.dtype(), overrides)
    kl_dir = work / "model-kl"
    if s.kl_seqs is not None and not (b.ppl_ratio == 1.0 and s.budgeted):
        if not state["kl_done"]:   # (a zero budget keeps the original: nothing to distil)
            if kl_dir.exists():
                shutil.rmtree(kl_dir)
            kl_dir.mkdir()
            rec = global_kl(src, model_dir, kl_dir, shards, cfg_json, s.kl_seqs, s.held,
                            cfg, state.get("current_ppl"), state.get("original_ppl"),
                            resume=s.kl_saved(), on_round=s.kl_round_done)
            state.update(kl_done=True, global_kl=rec)
            if rec["kept"] and rec["ppl"] is not None:
                state["current_ppl"] = rec["ppl"]
            for shard in shards if rec["kept"] else ():
                s._track(f"model-kl/{shard}")
            s.checkpoint(state["next_block"], True)
    shard_dir = kl_dir if state.get("global_kl", {}).get("kept") else model_dir
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    fit_cfg = cfg.fingerprint_dict()
    extras = {"reductions": [], "blockwise": {
        "config": fit_cfg, "history": state["history"],
        "calibration": {"sequences": int(s.seqs.shape[0]), "seq_len": int(s.seqs.shape[1]),
                        "heldout_sequences": 0 if s.held is None else int(s.held.shape[0])},
        "params_before": src.n_params(), "global_kl": state.get("global_kl"),
        "original_ppl": state.get("original_ppl"), "final_ppl": state.get("current_ppl"),
        "residual": state.get("residual")}}
    params_after = write_model(final, shard_dir, shards, cfg_json, extras)
    if src.path is not None:   # tokenizer and generation files
        for f in src.path.iterdir():
            if f.is_file() and f.name not in ("config.json", "plan.json") and \
                    not f.name.endswith((".safetensors", ".bin", ".index.json", ".pt")):
                shutil.copy2(f, final / f.name)
    seconds = state["seconds"] + time.perf_counter() - t_tail   # blocks + assembly
    _publish(final, out)
    shutil.rmtree(work, ignore_errors=True)
    return BlockwiseResult(out, [StepRecord.from_dict(d) for d in state["history"]],
                           src.n_params(), params_after, seconds, cfg.to_dict(),
                           state.get("original_ppl"), state.get("current_ppl"),
                           s.stats_out, state.get("residual"), state.get("global_kl"))


def _publish(model_dir: Path, out: Path) -> None:
    """Move the finished model dir to ``out`` (replacing an old one) with renames."""
    os.chmod(model_dir, 0o755)
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        model_dir.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        model_dir.rename(out)
    fsync_dir(out.parent)


def global_kl(src: WeightSource, shard_dir: Path, out_dir: Path, shards: list[str],
              cfg_json: dict, seqs: torch.Tensor, held: torch.Tensor | None,
              cfg: CompressConfig, start_ppl: float | None, original_ppl: float | None,
              *, resume: dict | None = None, on_round: Callable[[dict], None] | None = None
              ) -> dict:
    """Distil the whole compressed model (``shards`` in ``shard_dir``) on the original
    model's log-probabilities over ``seqs``; write its shards to ``out_dir``. Rounds of
    ``global_kl_steps`` Adam steps (random batches, 10% warm-up, linear decay); with a
    budget (``held`` given) the held-out perplexity is measured after each round and rounds
    continue, up to ``kl_rounds``, while it is over ``ppl_ratio`` x ``original_ppl``. The
    best weights measured are written, when they beat ``start_ppl`` (the block pass's
    perplexity). Loads both models whole (not bounded by one block).

    ``on_round(snapshot)`` is called after each finished round with ``{"round": rounds
    done, "rec", "best_ppl", "student": its weights, "best": the best weights (the same
    dict when the student is the best; None), "generator": the batch sampler's state}``;
    passing such a snapshot back as ``resume`` continues from it, giving the weights an
    uninterrupted run gives (each round starts a fresh optimizer).

    Returns the record: tokens, per round its steps and held-out perplexity, the best
    perplexity (``ppl``; None without a budget) and whether the distilled weights are kept.
    """
    from tqdm.auto import tqdm

    from ..llm.evaluate import perplexity

    b = cfg.blockwise
    teacher = src.model
    if teacher is None:
        teacher = family.causal_lm_class(src.config).from_pretrained(
            str(src.path), local_files_only=True, dtype=torch.float32)
    dev = torch.device(b.device)
    teacher = teacher.to(dev).eval()
    student = build_from_shards(shard_dir, shards, cfg_json).to(dev)
    keys_of = shard_keys(shard_dir, shards)
    names = [k for keys in keys_of.values() for k in keys]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_983)
    steps, bs = b.global_kl_steps, min(b.batch_size, seqs.shape[0])
    target = None if held is None else float(b.ppl_ratio) * float(original_ppl)
    rec: dict = {"tokens": int(seqs.numel()), "steps_per_round": steps, "rounds": [],
                 "ppl_before": start_ppl, "target_ppl": target}
    best, best_ppl = None, math.inf if start_ppl is None else float(start_ppl)
    first, rounds = 0, b.kl_rounds if held is not None else 1
    if resume is not None:
        first, rec, best_ppl = resume["round"], resume["rec"], resume["best_ppl"]
        _load_weights(student, resume["student"])
        gen.set_state(resume["generator"])
        best = resume["best"]   # (loading copied the student's dict: it stays as saved)
        if held is None or best_ppl <= target * (1 + 1e-9):
            first = rounds   # it had ended
    warm = max(1, steps // 10)
    for r in range(first, rounds):
        opt = torch.optim.Adam(student.parameters(), lr=b.global_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / warm) * max(0.0, 1.0 - t / steps))
        student.train()
        bar = tqdm(range(steps), desc=f"global KL (round {r + 1})", disable=not cfg.progress)
        loss_sum = 0.0
        for _ in bar:
            idx = torch.randint(0, seqs.shape[0], (bs,), generator=gen)
            ids = seqs[idx].to(dev)
            with torch.no_grad():
                t = teacher(input_ids=ids).logits.float().log_softmax(-1)
            st = student(input_ids=ids).logits.float().log_softmax(-1)
            loss = torch.nn.functional.kl_div(st.flatten(0, 1), t.flatten(0, 1),
                                              log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            bar.set_postfix(kl=f"{loss.item():.4f}")
        row = {"steps": steps, "mean_kl": loss_sum / steps}
        improved = held is None
        if held is not None:
            with torch.no_grad():
                row["ppl"] = perplexity(student, held, batch_size=b.batch_size)
            improved = row["ppl"] < best_ppl
            best_ppl = min(best_ppl, row["ppl"])
        rec["rounds"].append(row)
        current = weights_of(student, names)
        if improved:
            best = current
        if on_round is not None:
            on_round({"round": r + 1, "rec": rec, "best_ppl": best_ppl, "student": current,
                      "best": best, "generator": gen.get_state()})
        if held is None or best_ppl <= target * (1 + 1e-9):
            break
    rec.update(kept=best is not None, ppl=None if held is None else best_ppl)
    if best is not None:
        dtype = src.dtype()
        for shard, keys in keys_of.items():
            write_shard(out_dir / shard, {k: best[k].to(dtype) for k in keys})
    return rec


def shard_keys(shard_dir: Path, shards: list[str]) -> dict[str, list[str]]:
    """The tensor names of each of ``shards``."""
    from safetensors import safe_open

    out = {}
    for shard in shards:
        with safe_open(str(shard_dir / shard), framework="pt", device="cpu") as f:
            out[shard] = list(f.keys())
    return out


def weights_of(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s tensors ``names`` (the shards' keys: each weight once, a
    tied head not among them)."""
    sd = model.state_dict()
    return {k: sd[k].detach().to("cpu", copy=True) for k in names}


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load :func:`weights_of`'s tensors; a key may be missing only where it is tied to a
    loaded one."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    sd = model.state_dict()
    loaded = {sd[k].data_ptr() for k in weights}
    untied = [k for k in missing if sd[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(f"KL round weights do not match the model: missing {untied}, "
                           f"unexpected {unexpected}")


def format_blocks(result: BlockwiseResult) -> str:
    """A per-block table: k / d per site, relative output error after the cut and after
    the local distillation, held-out perplexity, parameters, seconds, status."""
    rows = [("block", "sites k/d", "err cut", "err distilled", "ppl", "params", "s",
             "status")]
    for b in result.blocks:
        sites = ", ".join(f"{s['site'].split(':')[0].split('.')[-1]} {s['k']}/{s['d']}"
                          for s in b.sites)
        ppl = b.sites[0].get("metric_after")
        rows.append((str(b.index), sites, f"{b.error_cut:.4f}", f"{b.error_final:.4f}",
                     "-" if ppl is None else f"{ppl:.3f}",
                     f"{b.params_before:,} -> {b.params_after:,}", f"{b.seconds:.1f}",
                     b.status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
