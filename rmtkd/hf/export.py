"""Compressed Hugging Face models as directories that ``transformers`` loads without rmtkd.

Every :func:`rmtkd.save` of a Hugging Face model (format "rmtkd-hf", :mod:`rmtkd.saving`)
and every block-wise output (:mod:`rmtkd.llm.hfdir`) is such a directory: ``config.json``
keeps the stock ``model_type`` and adds ``rmtkd_blocks`` (the widths), ``rmtkd_layout``
(:func:`remote_code_config`: where the blocks and their projections are) and ``auto_map``
(the Auto classes of the saved class -> ``modeling_rmtkd.Rmtkd<Class>``), and the directory
holds ``modeling_rmtkd.py`` (:func:`write_modeling_file`, a verbatim copy of
:mod:`rmtkd.hf.modeling_rmtkd`). So both of these work on it::

    rmtkd.load(out)
    transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

``rmtkd.save(model, out, tokenizer_dir=DIR)`` copies the tokenizer files of ``DIR`` in
(:func:`copy_tokenizer`), so that ``transformers.AutoTokenizer.from_pretrained(out)`` works
too.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from . import modeling_rmtkd
from .modeling_rmtkd import CLASS_PREFIX, LAYOUT_KEY

MODELING_FILE = "modeling_rmtkd.py"

#: files of a tokenizer directory that :func:`copy_tokenizer` copies, where present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json", "tokenizer.model", "merges.txt", "vocab.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
#: copied along when present, but not a tokenizer by themselves
EXTRA_FILES = ("generation_config.json",)

# transformers Auto class -> its model mapping (transformers.models.auto.modeling_auto)
_AUTO_MAPPINGS = (
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
)

__all__ = ["MODELING_FILE", "TOKENIZER_FILES", "auto_classes", "remote_code_config",
           "remote_code_config_for", "write_modeling_file", "copy_tokenizer",
           "check_tokenizer_dir"]


def auto_classes(class_name: str, model_type: str | None) -> list[str]:
    """The transformers Auto classes that build ``class_name`` for ``model_type`` (e.g.
    ``["AutoModelForSequenceClassification"]`` for BertForSequenceClassification)."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return []
    out = []
    for auto, table in _AUTO_MAPPINGS:
        names = getattr(modeling_auto, table, {}).get(model_type)
        if names == class_name or (isinstance(names, (tuple, list)) and class_name in names):
            out.append(auto)
    return out


def remote_code_config(model: nn.Module) -> dict:
    """``{"rmtkd_layout": ..., "auto_map": {...}}`` to add to the config.json of ``model``
    (a transformers model of an adapter's family); ``{}`` for a model without transformer
    blocks."""
    from ..adapters import TransformerAdapter, adapter_for

    ad = adapter_for(model, strict=False)
    if not isinstance(ad, TransformerAdapter):
        return {}
    name = type(model).__name__
    ref = f"{Path(MODELING_FILE).stem}.{CLASS_PREFIX}{name}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {LAYOUT_KEY: ad.layout_record(model),
            "auto_map": {auto: ref for auto in auto_classes(name, model_type)}}


def remote_code_config_for(cfg: dict) -> dict:
    """:func:`remote_code_config` of the model that the config dict ``cfg`` describes (its
    ``architectures[0]`` class, built on the meta device; the layout does not depend on
    the widths)."""
    import torch

    from ..saving import hf_class

    cls = hf_class((cfg.get("architectures") or [None])[0])
    config = cls.config_class.from_dict({k: v for k, v in cfg.items() if k != LAYOUT_KEY})
    with torch.device("meta"):
        model = cls(config)
    return remote_code_config(model)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_modeling_file(out_dir: str | os.PathLike) -> Path:
    """Copy :mod:`rmtkd.hf.modeling_rmtkd` verbatim to ``out_dir/modeling_rmtkd.py``."""
    dst = Path(out_dir) / MODELING_FILE
    shutil.copyfile(Path(modeling_rmtkd.__file__), dst)
    _fsync(dst)
    return dst


def check_tokenizer_dir(src_dir: str | os.PathLike) -> list[str]:
    """The names of the files that :func:`copy_tokenizer` would copy from ``src_dir``.

    Raises:
        FileNotFoundError: ``src_dir`` is not a directory or holds no tokenizer file.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} does not exist or is not a "
                                f"directory")
    names = [n for n in TOKENIZER_FILES + EXTRA_FILES if (src / n).is_file()]
    if not any(n in TOKENIZER_FILES for n in names):
        raise FileNotFoundError(f"{src} holds no tokenizer file (looked for "
                                f"{', '.join(TOKENIZER_FILES)}); pass the directory that "
                                f"tokenizer.save_pretrained wrote")
    return names


def copy_tokenizer(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (:data:`TOKENIZER_FILES`) and ``generation_config.json`` of
    ``src_dir`` that exist into ``out_dir``; returns the names copied.

    Raises:
        FileNotFoundError: see :func:`check_tokenizer_dir`.
    """
    names = check_tokenizer_dir(src_dir)
    src, out = Path(src_dir), Path(out_dir)
    for n in names:
        shutil.copyfile(src / n, out / n)
        _fsync(out / n)
    return names
