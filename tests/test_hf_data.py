"""rmtkd.hf.data: text files (CSV/TSV/JSONL/JSON/TXT, compressed, a datasets directory) read
into TextData, bad data refused up front with the row and column, labels numbered, seeded
splits, and length-bucketed, dynamically padded batches from a real (offline) tokenizer."""
import bz2
import gzip
import inspect
import json
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from rmtkd.errors import InputError
from rmtkd.hf.data import (DATASETS_HINT, VAL_FRACTION, TextData, check_finite_tensors,
                           default_max_length, encode, label_ids, read_records,
                           split_records)

WORDS = [f"w{i}" for i in range(30)]


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_text(text, encoding=encoding)
    return p


def read_cls(path, **kw):
    return read_records(path, task="classification", **kw)


# ------------------------------------------------------------------------------ formats


def test_csv_bom_quotes_blank_lines(tmp_path):
    p = write(tmp_path, "d.csv", 'text,label,extra\n"hello, world",pos,1\n\nbye,neg,2\n'
              '"multi\nline ""quoted""",pos,3\n', encoding="utf-8-sig")
    d = read_cls(p)
    assert d.texts == ["hello, world", "bye", 'multi\nline "quoted"']
    assert d.labels == ["pos", "neg", "pos"]
    assert d.source == str(p) and len(d) == 3 and not d.pairs


def test_tsv(tmp_path):
    p = write(tmp_path, "d.tsv", "label\ttext\n1\tit was good\n0\tit, was bad\n")
    d = read_cls(p)
    assert d.texts == ["it was good", "it, was bad"] and d.labels == ["1", "0"]


def test_jsonl_skips_blank_lines(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0,'
              ' "id": 7}\n')
    d = read_cls(p)
    assert d.texts == ["a b", "c"] and d.labels == [1, 0]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_key(tmp_path, wrap):
    recs = [{"text": "x y", "label": "b"}, {"text": "z", "label": "a"}]
    p = write(tmp_path, "d.json", json.dumps({"data": recs} if wrap else recs))
    d = read_cls(p)
    assert d.texts == ["x y", "z"] and d.labels == ["b", "a"]


def test_txt_unlabelled(tmp_path):
    p = write(tmp_path, "d.txt", "first line\n\n   \nsecond line\r\nthird\n")
    d = read_records(p, task="embedding")
    assert d.texts == ["first line", "second line", "third"] and d.labels is None
    with pytest.raises(InputError, match="no labels"):
        read_cls(p)


def test_labels_ignored_unless_classification(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,\nb,\n")   # missing labels are fine here
    for task in ("embedding", "lm"):
        d = read_records(p, task=task)
        assert d.texts == ["a", "b"] and d.labels is None


def test_sentence_pairs(tmp_path):
    p = write(tmp_path, "d.csv", "premise,hypothesis,label\nA man.,A person.,entailment\n"
              "A cat.,A dog.,contradiction\n")
    d = read_cls(p, text_columns=("premise", "hypothesis"))
    assert d.texts == [("A man.", "A person."), ("A cat.", "A dog.")] and d.pairs
    assert d.labels == ["entailment", "contradiction"]


def test_compressed(tmp_path):
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(b"text,label\nu,1\nv,2\n"))
    assert read_cls(gz).texts == ["u", "v"]
    bz = tmp_path / "d.jsonl.bz2"
    bz.write_bytes(bz2.compress(b'{"text": "u", "label": 1}\n{"text": "v", "label": 2}\n'))
    assert read_cls(bz).labels == [1, 2]


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "one"))
    d = read_cls(tmp_path / "one")
    assert d.texts == ["a", "b", "c"] and d.labels == [0, 1, 0]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    d = read_cls(tmp_path / "dict")
    assert d.texts == ["a", "b", "c"] and "'train'" in d.source
    with pytest.raises(InputError, match="no column 'sentence'"):
        read_cls(tmp_path / "one", text_columns=("sentence",))


def test_datasets_not_installed(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)   # import datasets -> ImportError
    with pytest.raises(InputError) as e:
        read_cls(tmp_path / "ds")
    assert DATASETS_HINT in str(e.value)


def test_plain_directory_refused(tmp_path):
    with pytest.raises(InputError, match="save_to_disk"):
        read_cls(tmp_path)


# --------------------------------------------------------------------------- validation

BAD = [  # (file name, content, substrings of the message)
    ("nan.csv", "text,label\na,pos\nb,neg\nc,NaN\n", ["row 3", "line 4", "'label'", "NaN"]),
    ("empty_label.csv", "text,label\na,pos\nb,\nc,neg\n", ["row 2", "line 3", "'label'"]),
    ("none_label.tsv", "text\tlabel\na\tpos\nb\tNone\n", ["row 2", "'label'"]),
    ("short_row.csv", "text,label\na,pos\nb\n", ["row 2", "'label'", "missing"]),
    ("empty_text.csv", 'text,label\na,pos\n"  ",neg\n', ["row 2", "'text'", "empty"]),
    ("nan_text.csv", "text,label\na,pos\nnan,neg\n", ["row 2", "'text'", "nan"]),
    ("missing_col.csv", "sentence,label\na,pos\n", ["'text'", "line 1", "'sentence'"]),
    ("too_many.csv", "text,label\na,pos,x\n", ["row 1", "3 fields"]),
    ("missing_key.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n',
     ["row 2", "line 2", "'label'", "'text'"]),
    ("nan.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n'
     '{"text": "c", "label": NaN}\n', ["row 3", "line 4", "'label'", "nan"]),
    ("inf.json", '[{"text": "a", "label": 1}, {"text": "b", "label": Infinity}]',
     ["row 2", "'label'", "inf"]),
    ("null_text.json", '[{"text": "a", "label": 1}, {"text": null, "label": 0}]',
     ["row 2", "'text'", "missing"]),
    ("number_text.json", '[{"text": 5, "label": 1}, {"text": "b", "label": 0}]',
     ["row 1", "'text'", "int"]),
    ("nan_text.json", '[{"text": NaN, "label": 1}, {"text": "b", "label": 0}]',
     ["row 1", "'text'", "nan"]),
    ("fraction.jsonl", '{"text": "a", "label": 0.5}\n', ["row 1", "'label'", "0.5"]),
    ("list_label.jsonl", '{"text": "a", "label": [1]}\n', ["row 1", "'label'", "list"]),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', ["row 2", "line 2", "JSON"]),
    ("not_record.jsonl", '["a", 1]\n', ["row 1", "list"]),
    ("one_class.csv", "text,label\na,pos\nb,pos\nc, pos\n", ["'label'", "3 rows", "2 classes"]),
    ("empty.csv", "", ["empty file"]),
    ("header_only.csv", "text,label\n", ["no data rows"]),
    ("empty.jsonl", "\n\n", ["no data rows"]),
    ("dict.json", '{"rows": []}', ["JSON list", "rows"]),
]


@pytest.mark.parametrize("name,content,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_data_refused(tmp_path, name, content, expected):
    p = write(tmp_path, name, content)
    with pytest.raises(InputError) as e:
        read_cls(p)
    msg = str(e.value)
    assert str(p) in msg
    for s in expected:
        assert s.lower() in msg.lower(), (s, msg)


def test_bad_arguments(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,0\nb,1\n")
    with pytest.raises(InputError, match="label column"):
        read_cls(p, label_column=None)
    with pytest.raises(InputError, match="unknown task"):
        read_records(p, task="regression")
    with pytest.raises(InputError, match="one or two"):
        read_cls(p, text_columns=("a", "b", "c"))
    with pytest.raises(InputError, match="does not exist"):
        read_cls(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="unknown data format"):
        read_cls(write(tmp_path, "d.parquet", "x"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(InputError, match="line 2 is not UTF-8"):
        read_cls(latin)


def test_check_finite_tensors():
    x = torch.randn(6, 3)
    check_finite_tensors((x, torch.arange(6)), "d.pt['train']")
    check_finite_tensors({"input_ids": torch.ones(2, 4, dtype=torch.long)}, "d.pt['val']")
    bad = x.clone()
    bad[2, 1] = float("nan")
    bad[4, 0] = float("inf")
    with pytest.raises(InputError) as e:
        check_finite_tensors((bad, torch.arange(6)), "d.pt['train']")
    msg = str(e.value)
    assert "d.pt['train'][0]" in msg and "rows 2, 4" in msg and "NaN/Inf" in msg
    with pytest.raises(InputError, match=r"\['val'\]\['x'\]: NaN in 1 of 2 rows"):
        check_finite_tensors({"train": (x,), "val": {"x": torch.tensor([0.0, float("nan")])}},
                             "d.pt")


# ------------------------------------------------------------------------------- labels


def test_label_ids_through_model_label2id():
    ids, mapping = label_ids(["positive", "negative ", "positive"],
                             {"negative": 0, "positive": 1})
    assert ids == [1, 0, 1] and mapping == {"negative": 0, "positive": 1}
    with pytest.raises(InputError) as e:
        label_ids(["positive", "neutral"], {"negative": 0, "positive": 1})
    assert "'neutral'" in str(e.value) and "'negative', 'positive'" in str(e.value)


def test_label_ids_integers_kept():
    assert label_ids([2, 0, 1, 0], None) == ([2, 0, 1, 0],
                                            {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2})
    default = {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert label_ids(["2", "0", " 1"], default) == ([2, 0, 1], default)
    assert label_ids([1.0, 0.0], {"neg": 0, "pos": 1}) == ([1, 0], {"neg": 0, "pos": 1})
    with pytest.raises(InputError, match=r"\[3\] out of range.*0\.\.2"):
        label_ids([0, 3], default)
    with pytest.raises(InputError, match="out of range"):
        label_ids([0, -1], None)


def test_label_ids_sorted_numbering():
    ids, mapping = label_ids(["b", "c", "a", "b"], None)
    assert mapping == {"a": 0, "b": 1, "c": 2} and ids == [1, 2, 0, 1]
    # a placeholder label2id is not a naming: strings are numbered, within its size
    ids, mapping = label_ids(["yes", "no"], {"LABEL_0": 0, "LABEL_1": 1})
    assert mapping == {"no": 0, "yes": 1} and ids == [1, 0]
    with pytest.raises(InputError, match="3 classes.*2 outputs"):
        label_ids(["a", "b", "c"], {"LABEL_0": 0, "LABEL_1": 1})


# ------------------------------------------------------------------------------- splits


def test_split_records():
    data = TextData(texts=[f"t{i}" for i in range(25)], labels=list(range(25)), source="s")
    train, val = split_records(data, seed=3)
    assert len(val) == int(VAL_FRACTION * 25) == 2 and len(train) == 23
    assert set(train.texts).isdisjoint(val.texts)
    assert sorted(train.texts + val.texts) == sorted(data.texts)
    assert all(t == f"t{y}" for part in (train, val) for t, y in zip(part.texts, part.labels))
    again = split_records(data, seed=3)
    assert again[0].texts == train.texts and again[1].texts == val.texts
    assert any(split_records(data, seed=s)[1].texts != val.texts for s in range(4, 8))
    small = TextData(texts=["a", "b"], labels=None, source="s")
    assert [len(p) for p in split_records(small)] == [1, 1]
    with pytest.raises(InputError):
        split_records(TextData(texts=["a"], labels=None, source="s"))
    with pytest.raises(InputError):
        split_records(data, val_fraction=1.0)


# ----------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    cls = transformers.BertTokenizerFast
    key = "vocab_file" if "vocab_file" in inspect.signature(cls.__init__).parameters \
        else "vocab"   # transformers 4 / 5
    tok = cls(**{key: str(path)})
    assert tok.tokenize("w1 w2") == ["w1", "w2"]
    return tok


def random_texts(n, seed=0, max_words=20):
    """n texts of 2..max_words words, distinct in their first two words."""
    rng = random.Random(seed)
    return [" ".join([WORDS[i // 30], WORDS[i % 30]] + [
        rng.choice(WORDS) for _ in range(rng.randint(0, max_words - 2))]) for i in range(n)]


def check_batches(batches, tok, texts, labels, max_length, batch_size, pairs=False):
    """Every example exactly once (found by its ids), padded to the batch's longest, with
    its own label."""
    def ids_of(t):
        enc = tok(*t, truncation=True, max_length=max_length) if pairs else \
            tok(t, truncation=True, max_length=max_length)
        return tuple(enc["input_ids"])
    index = {ids_of(t): i for i, t in enumerate(texts)}
    assert len(index) == len(texts)   # the texts are distinguishable by their ids
    seen = []
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape
        assert ids.shape[0] <= batch_size
        lengths = mask.sum(1)
        assert ids.shape[1] == int(lengths.max()) <= max_length
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"} | (
            {"labels"} if labels is not None else set())
        for r in range(ids.shape[0]):
            n = int(lengths[r])
            assert bool(mask[r, :n].all()) and not bool(mask[r, n:].any())
            assert bool((ids[r, n:] == tok.pad_token_id).all())
            i = index[tuple(ids[r, :n].tolist())]
            assert n == len(ids_of(texts[i]))
            if labels is not None:
                assert int(b["labels"][r]) == labels[i]
            seen.append(i)
    assert sorted(seen) == list(range(len(texts)))


def padded_tokens(batches):
    return sum(b["input_ids"].numel() for b in batches)


def test_encode_buckets(tokenizer):
    texts = random_texts(61)
    labels = [i % 3 for i in range(61)]
    data = TextData(texts=texts, labels=None, source="s")
    kw = dict(max_length=16, batch_size=8, label_ids=labels)
    batches = encode(data, tokenizer, **kw)
    assert len(batches) == 8
    check_batches(batches, tokenizer, texts, labels, 16, 8)
    unsorted = encode(data, tokenizer, sort_by_length=False, **kw)
    check_batches(unsorted, tokenizer, texts, labels, 16, 8)
    assert [int(b["labels"][0]) for b in unsorted] == [labels[i] for i in range(0, 61, 8)]
    assert padded_tokens(batches) < padded_tokens(unsorted)
    # the batch order is shuffled, not by increasing length; deterministic for a seed
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths != sorted(widths)
    same = encode(data, tokenizer, **kw)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, same) for k in a)
    other = encode(data, tokenizer, seed=1, **kw)
    assert any(not torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(batches, other))


def test_encode_pairs_and_no_labels(tokenizer):
    texts = list(zip(random_texts(13, seed=1, max_words=6), random_texts(13, seed=2)))
    data = TextData(texts=texts, labels=None, source="s")
    batches = encode(data, tokenizer, max_length=12, batch_size=4)
    check_batches(batches, tokenizer, texts, None, 12, 4, pairs=True)
    assert all(bool(b["token_type_ids"].max() == 1) for b in batches)
    assert encode(TextData(texts=[], labels=None, source="s"), tokenizer, max_length=8,
                  batch_size=4) == []
    with pytest.raises(ValueError):
        encode(data, tokenizer, max_length=8, batch_size=4, label_ids=[0])


def test_encode_left_padding(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "padding_side", "left")
    data = TextData(texts=["w1", "w1 w2 w3"], labels=None, source="s")
    (b,) = encode(data, tokenizer, max_length=8, batch_size=2, sort_by_length=False)
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_default_max_length():
    tok = SimpleNamespace(model_max_length=512)
    assert default_max_length(tok, None) == 128
    assert default_max_length(tok, None, cap=1024) == 512
    huge = SimpleNamespace(model_max_length=int(1e30))
    assert default_max_length(huge, SimpleNamespace(max_position_embeddings=64)) == 64
    assert default_max_length(huge, {"max_position_embeddings": 100}) == 100
    assert default_max_length(huge, SimpleNamespace()) == 128
