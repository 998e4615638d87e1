"""Hugging Face decoder directories (the Llama family of :mod:`rmtkd.adapters.llama`),
tensor by tensor.

:class:`WeightSource` reads one tensor at a time from ``config.json`` + ``*.safetensors``
(single file or sharded with ``model.safetensors.index.json``, as ``save_pretrained``
writes them) through ``safetensors.safe_open``, so the full model is never in memory; it
also wraps an in-memory causal LM of the family (tests).

While a job runs, the output is kept as per-block shards ``model-XXXXX-of-YYYYY.safetensors``
(shard 1: the embedding, shards 2..L+1: one decoder layer each, the last: final norm +
lm_head). :func:`write_model` then streams them into the :func:`rmtkd.load` format
("rmtkd-hf": ``model.safetensors`` + ``config.json`` with the per-layer widths of
:func:`rmtkd.reduce.record_widths` + ``plan.json`` + ``modeling_rmtkd.py``, which
``transformers`` loads with ``trust_remote_code=True``, see :mod:`rmtkd.hf.export`), one
tensor at a time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class UnsupportedLLMError(ValueError):
    """The model is not a decoder of a supported family (or its directory is incomplete)."""


def decoder_config(cfg: Any) -> Any:
    """The family's config object (see :func:`rmtkd.adapters.llama.decoder_config`);
    another model type raises UnsupportedLLMError naming the supported families."""
    from ..adapters import UnsupportedArchitectureError
    from ..adapters.llama import decoder_config as make

    try:
        return make(cfg)
    except UnsupportedArchitectureError as e:
        raise UnsupportedLLMError(str(e)) from e


class WeightSource:
    """Tensors of a decoder model by state-dict name, read lazily.

    Use :meth:`from_dir` (a ``save_pretrained`` directory) or :meth:`from_model`.
    ``config`` is the family's config object; ``path`` the directory (None for a model).
    """

    def __init__(self, config: Any, files: dict[str, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None, path: Path | None = None,
                 model: nn.Module | None = None) -> None:
        self.config = decoder_config(config)
        self._files = files or {}          # tensor name -> safetensors file name
        self._state = state                # in-memory state dict (from_model)
        self.path = path
        self.model = model

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "WeightSource":
        from safetensors import safe_open

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: expected a Hugging Face model "
                                    f"directory written by save_pretrained")
        cfg = json.loads((p / "config.json").read_text())
        if (p / INDEX).is_file():
            weight_map = json.loads((p / INDEX).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        elif (p / SINGLE).is_file():
            shards, weight_map = [SINGLE], None
        else:
            raise FileNotFoundError(f"{p} has neither {SINGLE} nor {INDEX}; only safetensors "
                                    f"weights are read (re-save with save_pretrained)")
        if weight_map is None:
            with safe_open(str(p / SINGLE), framework="pt", device="cpu") as f:
                weight_map = {name: SINGLE for name in f.keys()}
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{p}: weight files {missing} named by {INDEX} are missing")
        return cls(cfg, files=weight_map, path=p)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors, opening each file only for the read: a file kept open stays mapped
        and every page read from it would count in the resident set until the end."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._files[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(self.path / file), framework="pt", device="cpu") as f:
                for n in group:
                    out[n] = f.get_tensor(n).clone()
        return out

    @classmethod
    def from_model(cls, model: nn.Module) -> "WeightSource":
        from ..adapters.llama import DECODERS

        names = [d.causal_lm for d in DECODERS.values()]
        if type(model).__name__ not in names:
            raise UnsupportedLLMError(f"expected one of {names}, got {type(model).__name__}")
        return cls(model.config, state=dict(model.state_dict()), model=model)

    def weight_files(self) -> list[Path]:
        """The safetensors files of a directory source (empty for an in-memory model)."""
        if self.path is None:
            return []
        return [self.path / f for f in sorted(set(self._files.values()))]

    def names(self) -> list[str]:
        return list(self._state) if self._state is not None else list(self._files)

    def has(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._files)

    def get(self, name: str) -> torch.Tensor:
        """A CPU copy of tensor ``name`` (its stored dtype)."""
        if self._state is not None:
            if name not in self._state:
                raise KeyError(f"the model has no tensor {name!r}")
            return self._state[name].detach().to("cpu").clone()
        if name not in self._files:
            raise UnsupportedLLMError(f"{self.path}: no tensor {name!r} in the safetensors "
                                      f"files; is this a causal LM directory of the Llama "
                                      f"family?")
        return self._read([name])[name]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{name without prefix: tensor}`` for every tensor whose name starts with it."""
        names = [n for n in self.names() if n.startswith(prefix)]
        if self._state is not None:
            return {n[len(prefix):]: self.get(n) for n in names}
        return {n[len(prefix):]: t for n, t in self._read(names).items()}

    def numel(self, name: str) -> int:
        """Elements of tensor ``name``, from its shape (nothing is read)."""
        if self._state is not None:
            return int(self._state[name].numel())
        from safetensors import safe_open

        with safe_open(str(self.path / self._files[name]), framework="pt", device="cpu") as f:
            return int(torch.Size(f.get_slice(name).get_shape()).numel())

    def tied(self) -> bool:
        """Whether the head is the token-embedding table (``tie_word_embeddings``)."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def lm_head(self) -> torch.Tensor:
        from ..adapters.llama import EMBED, LM_HEAD

        if self.has(LM_HEAD):
            return self.get(LM_HEAD)
        return self.get(EMBED)   # tied embeddings

    def n_params(self) -> int:
        """Parameters of the model (a tied lm_head counted once), from the tensor shapes."""
        from safetensors import safe_open

        if self._state is None:
            total = 0
            for file in set(self._files.values()):
                with safe_open(str(self.path / file), framework="pt", device="cpu") as f:
                    total += sum(int(torch.Size(f.get_slice(n).get_shape()).numel())
                                 for n in f.keys() if not n.endswith("rotary_emb.inv_freq"))
            return total
        seen = {t.data_ptr(): t.numel() for n, t in self._state.items()
                if not n.endswith("rotary_emb.inv_freq")}
        return sum(seen.values())

    def dtype(self) -> torch.dtype:
        """The dtype of the decoder weights (that of layer 0's q_proj)."""
        if getattr(self, "_dtype", None) is None:
            from ..adapters.llama import LAYOUT, layer_prefix

            self._dtype = self.get(layer_prefix(0) + LAYOUT.q + ".weight").dtype
        return self._dtype


# ------------------------------------------------------------------ output directory

def shard_name(j: int, total: int) -> str:
    return f"model-{j:05d}-of-{total:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save_file

    from ..files import fsync_dir

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ------------------------------------------------------------------ output model

def layer_widths(layer: nn.Module) -> dict:
    """One reduced layer's width record (:func:`rmtkd.reduce.transformer.block_widths`)."""
    from ..reduce.transformer import block_of, block_widths

    return block_widths(layer, block_of(layer)[1])


def config_dict(src: WeightSource, widths: list[dict], dtype: torch.dtype,
                overrides: dict | None = None) -> dict:
    """config.json of the compressed model: the source config with the per-layer widths
    (``rmtkd_blocks``), ``architectures``, ``dtype`` and ``overrides`` (the residual cut's
    hidden size and record)."""
    from ..adapters.llama import decoder
    from ..reduce.transformer import WIDTHS_KEY

    cfg = json.loads(src.config.to_json_string(use_diff=False))
    cfg.pop("_attn_implementation_autoset", None)
    cfg["architectures"] = [decoder(cfg).causal_lm]
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg[WIDTHS_KEY] = list(widths)
    cfg.update(overrides or {})
    from ..hf.export import remote_code_config_for

    cfg.update(remote_code_config_for(cfg))   # rmtkd_layout, auto_map (trust_remote_code)
    return cfg


def build_from_shards(shard_dir: Path, shards: list[str], cfg: dict) -> nn.Module:
    """The whole compressed model from its per-block shards (fp32, train mode off)."""
    from safetensors.torch import load_file

    from ..adapters.llama import causal_lm_class
    from ..saving import hf_build

    model = hf_build(causal_lm_class(cfg), cfg, None)
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        state.update(load_file(str(shard_dir / s)))
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if tied:
        model.tie_weights()
    return model.float().eval()


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def write_model(out_dir: Path, shard_dir: Path, shards: list[str], cfg: dict,
                extras: dict) -> int:
    """Write the compressed model in the :func:`rmtkd.load` format ("rmtkd-hf": one
    ``model.safetensors`` + ``config.json`` + ``plan.json``, and ``modeling_rmtkd.py`` when
    ``cfg`` has a layout), streaming the shards one tensor at a time (the header is computed
    from their shapes first). Also readable by the family's ``AutoModelForCausalLM.
    from_pretrained(..., trust_remote_code=True)`` (any widths) and by its plain
    ``from_pretrained`` when no layer changed shape. Returns the number of parameters
    written."""
    import struct

    from safetensors import safe_open

    from .. import __version__
    from ..files import fsync_dir, hash_file
    from ..saving import FORMAT_VERSION, HF_FORMAT, PLAN, WEIGHTS

    header: dict[str, Any] = {"__metadata__": {"format": HF_FORMAT}}
    order, offset, params = [], 0, 0
    for s in shards:
        with safe_open(str(shard_dir / s), framework="pt", device="cpu") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shape = list(sl.get_shape())
                dtype = {v: k2 for k2, v in _ST_DTYPES.items()}[sl.get_dtype()]
                n = int(torch.Size(shape).numel())
                nbytes = n * torch.empty((), dtype=dtype).element_size()
                header[k] = {"dtype": sl.get_dtype(), "shape": shape,
                             "data_offsets": [offset, offset + nbytes]}
                order.append((s, k))
                offset += nbytes
                params += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out_dir / WEIGHTS, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for s in dict.fromkeys(sh for sh, _ in order):
            with safe_open(str(shard_dir / s), framework="pt", device="cpu") as f:
                for k in f.keys():
                    t = f.get_tensor(k).contiguous()
                    out.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out.flush()
        os.fsync(out.fileno())
    aliases = ({"lm_head.weight": "model.embed_tokens.weight"}
               if cfg.get("tie_word_embeddings") else {})
    plan = {"format": HF_FORMAT, "format_version": FORMAT_VERSION, "rmtkd_version": __version__,
            "hf_class": cfg["architectures"][0], "dtype": cfg.get("dtype"), "aliases": aliases,
            "frozen": [], "sha256": hash_file(out_dir / WEIGHTS)[1], **extras}
    for name, obj in (("config.json", cfg), (PLAN, plan)):
        with open(out_dir / name, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
    from ..hf.export import LAYOUT_KEY, write_modeling_file

    if LAYOUT_KEY in cfg:
        write_modeling_file(out_dir)
    fsync_dir(out_dir)
    return params


def load_compressed(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
    """A model written by :func:`rmtkd.engine.compress_blockwise` (= :func:`rmtkd.load`),
    optionally cast to ``dtype``; eval mode. Loads the whole model."""
    from ..saving import load

    model = load(path, map_location=device)
    return (model if dtype is None else model.to(dtype)).eval()
