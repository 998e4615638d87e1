"""Block-wise RMT-KD of decoder LLMs (Llama layout) in bounded memory.

``compress_blockwise(model_dir, tokens, config=BlockwiseConfig(...), out=DIR)`` processes
the model one decoder block at a time; only one block's weights and the calibration
hidden states (memory-mapped files) are ever held:

1. the embedding is read (``safetensors.safe_open``) and the calibration tokens ``[N, T]``
   are embedded into a memory-mapped file ``[N, T, hidden]`` under the job's work dir;
2. for each block i: build a ``LlamaDecoderLayer`` and load its weights; run it on the
   stored states (chunks of ``batch_size`` sequences) -> the local teacher targets (a
   second memmap) while forward hooks feed one covariance accumulator per site (n = N*T
   tokens); fit the Marchenko-Pastur spikes (:func:`rmtkd.spikes`) and cut the block;
   distil it locally (Adam on the relative squared error to the targets); write its
   weights as one shard (safetensors file) in the work dir; run it again -> the next
   block's inputs (a third memmap; input and output files alternate);
3. the final norm and lm_head are copied; optionally (``global_kl_steps > 0``) the whole
   student is distilled on the original model's logits (KL) -- this step loads both
   models whole, so it is off by default; the shards are streamed, one tensor at a time,
   into ``out`` in the :func:`rmtkd.load` format (``model.safetensors``, ``config.json``
   with the per-layer widths, ``plan.json`` with the block records).

Sites, per block (surgery: :mod:`rmtkd.reduce.llama`): ``width`` mode cuts the MLP inner width
(input of ``mlp.down_proj``; approximate through the gated product, then distilled) and the
attention value/output width per key-value head (output of ``self_attn.v_proj``; exact);
``project`` mode replaces chosen nn.Linear modules (default all seven) by
:class:`rmtkd.nn.ProjectedLinear` onto the spike directions of their input.

Kill safety: after each block a checkpoint (``state.pt``: next block, which states file
is current, the block records, RNG states) is written atomically (temporary file, fsync,
rename) into the work dir ``.<out>.work`` beside ``out``. ``resume=True`` continues from the
last finished block; every block seeds its own random generator from ``(seed, block)``,
so a resumed job writes the same weights as an uninterrupted one. The output directory
appears at the end with one rename.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import damaged, fsync_dir, hash_file, rng_states, set_rng_states
from .llm.block import (LINEARS, block_sites, chunks, cut_block, distill_block,
                        load_layer, position_embeddings, rel_error, teacher_pass)
from .llm.evaluate import token_sequences
from .llm.hfdir import (WeightSource, build_from_shards, config_dict, layer_prefix,
                        layer_widths, shard_name, write_model, write_shard)
from .ops.covariance import CovarianceStats
from .reduce.plan import n_params
from .spectral.estimators import DEFAULT_MARGIN

MODES = ("width", "project")
STATE = "state.pt"


@dataclass
class BlockwiseConfig:
    """Settings of :func:`compress_blockwise`.

    mode: "width" (MLP inner width + attention value width per kv head) or "project"
    (ProjectedLinear consumers).
    sites: project mode: layer-relative Linear names (default: all of LINEARS).
    keep_all: fit nothing, keep every direction (k = d) and apply the surgery anyway -- for
    checks (the output then computes the same function).
    estimator, margin, solver: of :func:`rmtkd.spikes`.
    calib_tokens: calibration tokens used (rounded up to whole sequences of seq_len).
    seq_len: tokens per calibration sequence. batch_size: sequences per forward chunk.
    distill_epochs, lr: local distillation per block (Adam on the relative squared error to
    the original block's outputs); a distillation that ends worse than the plain surgery
    is undone.
    global_kl_steps, global_lr: optional final KL distillation on logits (loads the whole
    original and compressed models; 0 = off).
    acc_dtype: covariance accumulation dtype ("float32" or "float64").
    device: where a block runs ("cpu", "cuda"); states stay in memory-mapped files on disk.
    keep_stats: return every site's covariance in the result (tests; memory grows).
    """

    mode: str = "width"
    sites: list[str] | None = None
    keep_all: bool = False
    estimator: str = "auto"
    margin: float | str = DEFAULT_MARGIN
    solver: str = "auto"
    calib_tokens: int = 16384
    seq_len: int = 128
    batch_size: int = 8
    distill_epochs: int = 2
    lr: float = 1e-4
    global_kl_steps: int = 0
    global_lr: float = 1e-5
    acc_dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    keep_stats: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for s in self.sites or []:
            if s not in LINEARS:
                raise ValueError(f"unknown site {s!r}; project mode reduces the inputs of "
                                 f"{', '.join(LINEARS)}")
        if self.acc_dtype not in ("float32", "float64"):
            raise ValueError(f"acc_dtype must be 'float32' or 'float64', got "
                             f"{self.acc_dtype!r}")
        for name in ("calib_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_epochs < 0 or self.global_kl_steps < 0:
            raise ValueError("distill_epochs and global_kl_steps must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BlockRecord:
    """What happened to one block: per site d, k and whether it was cut; the relative error
    ``||y - t|| / ||t||`` of the block's outputs against the original block's on the
    calibration states, after the surgery and after distillation; parameters; seconds."""

    index: int
    sites: list[dict]
    error_cut: float
    error_final: float
    params_before: int
    params_after: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BlockwiseResult:
    out: Path
    blocks: list[BlockRecord]
    params_before: int
    params_after: int
    seconds: float
    config: dict
    stats: dict[int, dict[str, CovarianceStats]] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before


# ------------------------------------------------------------------------ checkpoint

_STATE_MAGIC = b"rmtkd-blockwise-state"


def _save_state(work: Path, state: dict) -> None:
    """Write ``state.pt`` atomically: a header line with the payload's size and sha256,
    then the pickled state (so a damaged file is detected before anything is unpickled)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = b"%s size=%d sha256=%s\n" % (_STATE_MAGIC, len(payload),
                                          hashlib.sha256(payload).hexdigest().encode())
    tmp = work / f".{STATE}.tmp"
    with open(tmp, "wb") as f:
        f.write(header + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, work / STATE)
    fsync_dir(work)


def _load_state(work: Path) -> dict:
    """The checkpoint of :func:`_save_state`, after checking ``state.pt`` and every file it
    lists (model shards, the current states file) against their sizes and sha256.

    Raises:
        CorruptCheckpointError: a truncated, changed or missing file (names it).
    """
    path = work / STATE
    raw = path.read_bytes()
    head, _, payload = raw.partition(b"\n")
    m = re.fullmatch(rb"%s size=(\d+) sha256=([0-9a-f]{64})" % _STATE_MAGIC, head)
    if m is None:
        raise damaged(f"{path} has no valid header", path, work)
    if len(payload) != int(m.group(1)):
        raise damaged(f"{path} is truncated ({len(payload)} of {int(m.group(1))} bytes)",
                      path, work)
    if hashlib.sha256(payload).hexdigest().encode() != m.group(2):
        raise damaged(f"{path} fails its checksum", path, work)
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    for rel, (size, digest) in state.get("files", {}).items():
        f = work / rel
        if not f.is_file():
            raise damaged(f"{f} is missing", f, work)
        got_size, got = hash_file(f)
        if got_size != size:
            raise damaged(f"{f} has {got_size} bytes, the checkpoint says {size} "
                          f"(truncated?)", f, work)
        if got != digest:
            raise damaged(f"{f} fails its checksum", f, work)
    return state


def _track(state: dict, work: Path, rel: str, drop: str | None = None) -> None:
    """Record a finished file's size and sha256 in the checkpoint state (``drop``: a file
    that is no longer needed, e.g. the states file about to be overwritten)."""
    files = state.setdefault("files", {})
    files[rel] = list(hash_file(work / rel))
    if drop is not None:
        files.pop(drop, None)


def work_dir(out: Path) -> Path:
    """Where the job keeps its states, shards and checkpoint: ``.<out>.work`` beside out."""
    return out.parent / f".{out.name}.work"


def _fingerprint(src: WeightSource, seqs: torch.Tensor, cfg: BlockwiseConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(src.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(src.path).encode())
    h.update(seqs.numpy().tobytes())
    h.update(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "progress"},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def _memmap(path: Path, shape: tuple, fresh: bool) -> np.memmap:
    return np.memmap(path, dtype=np.float32, mode="w+" if fresh or not path.exists() else "r+",
                     shape=shape)


# ----------------------------------------------------------------------------- driver

def compress_blockwise(model: Any, data: Any, *, out: str | os.PathLike,
                       config: BlockwiseConfig | None = None, resume: bool = False,
                       overwrite: bool = False, tokenizer: Any = None) -> BlockwiseResult:
    """Compress a Llama-layout causal LM block by block; write it to ``out``.

    Args:
        model: a Hugging Face model directory (config.json + safetensors; read tensor by
            tensor) or an in-memory ``LlamaForCausalLM``.
        data: calibration tokens (see :func:`rmtkd.llm.token_sequences`): a ``[N, T]`` or
            1-D int tensor, a list of them, or a list of strings (tokenized with
            ``tokenizer``, default: the model directory's, if it has one).
        out: output directory (the :func:`rmtkd.load` format; written at the end).
        config: the settings (:class:`BlockwiseConfig`).
        resume: continue the job whose work dir ``.<out>.work`` exists (same arguments).
        overwrite: replace an existing ``out``.

    Returns:
        :class:`BlockwiseResult` (block records, parameter counts; ``stats`` when
        ``config.keep_stats``).
    """
    cfg = config or BlockwiseConfig()
    cfg.validate()
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--force) to "
                              f"replace it")
    src = WeightSource.from_model(model) if isinstance(model, nn.Module) else \
        WeightSource.from_dir(model)
    if tokenizer is None and src.path is not None and isinstance(data, (list, tuple)) and \
            data and isinstance(data[0], str):
        tokenizer = load_tokenizer(src.path)
    seqs = token_sequences(data, cfg.seq_len, max_tokens=cfg.calib_tokens, tokenizer=tokenizer)
    config = src.config
    if int(seqs.max()) >= config.vocab_size or int(seqs.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}) (the model's "
                         f"vocab_size); got [{int(seqs.min())}, {int(seqs.max())}]")
    L, H = config.num_hidden_layers, config.hidden_size
    N, T = seqs.shape
    total = L + 2
    work = work_dir(out)
    model_dir = work / "model"
    fp = _fingerprint(src, seqs, cfg)
    state = None
    if resume and (work / STATE).is_file():
        if not model_dir.is_dir():
            raise ValueError(f"cannot resume: {work} has a checkpoint but no model shards "
                             f"(the job had finished? see {out}); drop --resume to rerun")
        state = _load_state(work)
        if state.get("fingerprint") != fp:
            raise ValueError(f"cannot resume: the work dir {work} belongs to a job with other "
                             f"arguments (model, data or settings); drop --resume to start "
                             f"afresh")
        set_rng_states(state["rng"])
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(exist_ok=True)
    shape = (N, T, H)
    fresh = state is None
    files = {k: _memmap(work / f"states-{k}.f32", shape, fresh) for k in ("a", "b")}
    targets = _memmap(work / "targets.f32", shape, fresh)
    dev = torch.device(cfg.device)
    pe = position_embeddings(config, T, dev)
    stats_out: dict[int, dict[str, CovarianceStats]] = {}

    if state is None:   # embed the calibration tokens -> states entering block 0
        emb = src.get("model.embed_tokens.weight")
        for a, b in chunks(N, cfg.batch_size):
            files["a"][a:b] = nn.functional.embedding(seqs[a:b], emb).float().numpy()
        files["a"].flush()
        write_shard(model_dir / shard_name(1, total), {"model.embed_tokens.weight": emb})
        del emb
        state = {"fingerprint": fp, "next_block": 0, "current": "a", "blocks": [],
                 "widths": [], "kl_done": False, "seconds": 0.0}
        _track(state, work, f"model/{shard_name(1, total)}")
        _track(state, work, "states-a.f32")
        state["rng"] = rng_states()
        _save_state(work, state)

    bar = tqdm(range(state["next_block"], L), desc="blocks", unit="block", total=L,
               initial=state["next_block"], disable=not cfg.progress)
    for i in bar:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        cur, nxt = state["current"], "b" if state["current"] == "a" else "a"
        layer = load_layer(src, i, dev)
        p_before = n_params(layer)
        accs = teacher_pass(layer, files[cur], targets, cfg, config, pe, block_sites(cfg, layer))
        targets.flush()
        if cfg.keep_stats:
            stats_out[i] = {s: a.finalize() for s, a in accs.items()}
        site_recs = cut_block(layer, accs, cfg, config)
        del accs
        err_cut = rel_error(layer, files[cur], targets, cfg, config, pe)
        err = err_cut
        if cfg.distill_epochs > 0 and not cfg.keep_all:
            saved = {k: v.clone() for k, v in layer.state_dict().items()}
            distill_block(layer, files[cur], targets, cfg, config, pe, gen)
            err = rel_error(layer, files[cur], targets, cfg, config, pe)
            if not err < err_cut:   # distillation did not help: keep the plain surgery
                layer.load_state_dict(saved)
                err = err_cut
        stored = {k: v.to(src.dtype()) for k, v in layer.state_dict().items()}
        write_shard(model_dir / shard_name(i + 2, total),
                    {layer_prefix(i) + k: v for k, v in stored.items()})
        # Next inputs: the outputs of the weights as stored (rounded to the model's dtype).
        layer.load_state_dict({k: v.float() for k, v in stored.items()})
        del stored
        rel_error(layer, files[cur], targets, cfg, config, pe, out=files[nxt])
        files[nxt].flush()
        rec = BlockRecord(i, site_recs, err_cut, err, p_before, n_params(layer),
                          time.perf_counter() - t0)
        _track(state, work, f"model/{shard_name(i + 2, total)}")
        _track(state, work, f"states-{nxt}.f32", drop=f"states-{cur}.f32")
        state["blocks"].append(rec.to_dict())
        state["widths"].append(layer_widths(layer))
        state.update(next_block=i + 1, current=nxt, rng=rng_states(),
                     seconds=state["seconds"] + rec.seconds)
        _save_state(work, state)
        bar.set_postfix(err=f"{err:.3g}", params=f"{rec.params_after}/{rec.params_before}")
        del layer
    bar.close()
    t_tail = time.perf_counter()

    head = {"model.norm.weight": src.get("model.norm.weight")}
    if not getattr(config, "tie_word_embeddings", False):
        head["lm_head.weight"] = src.lm_head()
    write_shard(model_dir / shard_name(total, total), head)
    del head
    for mm in (*files.values(), targets):
        mm._mmap.close()   # noqa: SLF001 -- the states are no longer needed
    shards = [shard_name(j, total) for j in range(1, total + 1)]
    cfg_json = config_dict(src, state["widths"], src.dtype())
    shard_dir = model_dir
    if cfg.global_kl_steps > 0:
        shard_dir = work / "model-kl"
        if not state["kl_done"]:
            if shard_dir.exists():
                shutil.rmtree(shard_dir)
            shard_dir.mkdir()
            global_kl(src, model_dir, shard_dir, shards, cfg_json, seqs, cfg)
            state.update(kl_done=True, rng=rng_states())
            _save_state(work, state)
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    extras = {"reductions": [], "blockwise": {
        "config": {k: v for k, v in cfg.to_dict().items() if k != "progress"},
        "blocks": state["blocks"], "calibration": {"sequences": N, "seq_len": T},
        "params_before": src.n_params(), "global_kl": cfg.global_kl_steps > 0}}
    params_after = write_model(final, shard_dir, shards, cfg_json, extras)
    if src.path is not None:   # tokenizer and generation files
        for f in src.path.iterdir():
            if f.is_file() and f.name not in ("config.json", "plan.json") and \
                    not f.name.endswith((".safetensors", ".bin", ".index.json", ".pt")):
                shutil.copy2(f, final / f.name)
    seconds = state["seconds"] + time.perf_counter() - t_tail   # blocks + assembly
    _publish(final, out)
    shutil.rmtree(work, ignore_errors=True)
    return BlockwiseResult(out, [BlockRecord(**b) for b in state["blocks"]], src.n_params(),
                           params_after, seconds, cfg.to_dict(), stats_out)


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


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model directory, or None when it has none."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def global_kl(src: WeightSource, shard_dir: Path, out_dir: Path, shards: list[str],
              cfg_json: dict, seqs: torch.Tensor, cfg: BlockwiseConfig) -> None:
    """Distil the whole compressed model (``shards`` in ``shard_dir``) on the original
    model's logits (KL, ``cfg.global_kl_steps`` Adam steps on random calibration batches);
    write its shards to ``out_dir``. Loads both models whole (not bounded by one block)."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    teacher = src.model
    if teacher is None:
        teacher = LlamaForCausalLM.from_pretrained(str(src.path), local_files_only=True,
                                                   dtype=torch.float32)
    dev = torch.device(cfg.device)
    teacher = teacher.to(dev).eval()
    student = build_from_shards(shard_dir, shards, cfg_json).to(dev).train()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_983)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.global_lr)
    for _ in tqdm(range(cfg.global_kl_steps), desc="global KL", disable=not cfg.progress):
        idx = torch.randint(0, seqs.shape[0], (min(cfg.batch_size, seqs.shape[0]),),
                            generator=gen)
        ids = seqs[idx].to(dev)
        with torch.no_grad():
            t = teacher(input_ids=ids).logits.float().log_softmax(-1)
        s = student(input_ids=ids).logits.float().log_softmax(-1)
        loss = torch.nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True,
                                          reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    state = student.state_dict()
    dtype = src.dtype()
    for shard in shards:
        with safe_open(str(shard_dir / shard), framework="pt", device="cpu") as f:
            keys = list(f.keys())
        write_shard(out_dir / shard, {k: state[k].to(dtype) for k in keys})


def format_blocks(result: BlockwiseResult) -> str:
    """A per-block table: k / d per site, relative output error after the cut and after
    the local distillation, parameters, seconds."""
    rows = [("block", "sites k/d", "err cut", "err distilled", "params", "s")]
    for b in result.blocks:
        sites = ", ".join(f"{s['site'].split(':')[0].split('.')[-1]} {s['k']}/{s['d']}"
                          for s in b.sites)
        rows.append((str(b.index), sites, f"{b.error_cut:.4f}", f"{b.error_final:.4f}",
                     f"{b.params_before:,} -> {b.params_after:,}", f"{b.seconds:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
