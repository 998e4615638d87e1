"""``rmtkd compress --model HF_DIR --data FILE.csv`` end to end on a tiny BERT classifier
built here: the job runs with the task defaults, the output loads with transformers
(trust_remote_code) and gives rmtkd.load's logits, the tokenizer is copied, the report
carries the test metric, bad data is refused before any work."""
from __future__ import annotations

import csv
import inspect
import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rmtkd.cli import main  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cls = transformers.BertTokenizerFast
    key = "vocab_file" if "vocab_file" in inspect.signature(cls.__init__).parameters \
        else "vocab"
    arg = str(path / "vocab.txt") if key == "vocab_file" else \
        {w: i for i, w in enumerate(vocab)}
    return cls(**{key: arg}, do_lower_case=True)


def _texts(n, seed):
    """Two classes: texts mostly of words 0-19 ("neg") or 20-39 ("pos")."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        lo = 20 if label == "pos" else 0
        words = [WORDS[lo + rng.randrange(20)] if rng.random() < 0.8 else rng.choice(WORDS)
                 for _ in range(rng.randrange(4, 16))]
        rows.append((" ".join(words), label))
    return rows


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny BertForSequenceClassification, trained a little on the task so there is
    something to keep, saved with save_pretrained and its tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer_dir(root / "model")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64,
                                  num_labels=2, id2label={0: "neg", 1: "pos"},
                                  label2id={"neg": 0, "pos": 1})
    model = transformers.BertForSequenceClassification(cfg)
    rows = _texts(256, 1)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    y = torch.tensor([int(lab == "pos") for _, lab in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(**enc, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    _csv(root / "train.csv", _texts(320, 2))
    _csv(root / "test.csv", _texts(64, 3))
    return root


def test_compress_hf_dir_and_csv_loads_with_transformers(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "job.toml"   # a small job: fewer distillation steps than the defaults
    cfg.write_text("[compress]\ndistill_max_steps = 10\nresidual_distill_steps = 10\n"
                   "epsilon = 100.0\n")
    rc = main(["compress", "--model", str(hf_dir / "model"), "--data",
               str(hf_dir / "train.csv"), "--test-data", str(hf_dir / "test.csv"),
               "--config", str(cfg), "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "accuracy (%) (test)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["task"] == "classification"
    assert report["meta"]["rows"] == {"train": 288, "val": 32, "test": 64}
    assert report["meta"]["test_data"] == str(hf_dir / "test.csv")
    assert report["summary"]["final_params"] < report["summary"]["original_params"]
    # the sites are the task defaults' kinds only: the token-embedding rank, each block's
    # MLP inner width, each block's head width, then the residual stream; none calibrated
    # to be skipped for being of another kind
    sites = [r["site"] for r in report["history"]]
    assert sites[0] == "bert.embeddings.word_embeddings:output"
    assert sites[-1] == "bert.embeddings.LayerNorm:output"
    n = (len(sites) - 2) // 2
    assert n >= 1 and len(sites) == 2 * n + 2
    assert all(s.endswith(".output.dense:input") for s in sites[1:1 + n])
    assert all(s.endswith(".attention.self.query:input") for s in sites[1 + n:-1])
    model_dir = out / "model"
    assert (model_dir / "modeling_rmtkd.py").is_file()
    import rmtkd

    ours = rmtkd.load(model_dir)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok([t for t, _ in _texts(8, 9)], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ours(**enc).logits, theirs(**enc).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert sum(p.numel() for p in theirs.parameters()) == report["summary"]["final_params"]
    assert theirs.config.label2id == {"neg": 0, "pos": 1}


def test_string_labels_numbered_when_the_config_has_none(hf_dir, tmp_path):
    """A model with placeholder labels: the CSV's label names are numbered in sorted order
    and stored in the output config."""
    from rmtkd.hf.job import text_job

    job = text_job(hf_dir / "model", hf_dir / "train.csv", seed=0)
    assert job.label2id == {"neg": 0, "pos": 1}
    assert sum(len(b["labels"]) for b in job.splits["train"]) == 256
    assert {k: sum(len(b["labels"]) for b in v) for k, v in job.splits.items()} == \
        {"train": 256, "val": 32, "test": 32}
    # labels follow their texts: the training batches reproduce the file's rows
    rows = dict(_texts(320, 2))
    tok = job.hf.tokenizer
    for b in job.splits["train"][:3]:
        for ids, mask, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            text = tok.decode(ids[mask.bool()], skip_special_tokens=True)
            assert job.label2id[rows[text]] == int(lab)


@pytest.mark.parametrize("bad, message", [
    ("w1 w2,nan\n", "row 2"),
    (",pos\n", "row 2"),
    ("w1 w2,maybe\n", "maybe"),
])
def test_bad_data_is_refused_before_any_work(hf_dir, tmp_path, capsys, bad, message):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nw1 w3,pos\n" + bad + "w4,neg\n")
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", str(hf_dir / "model"), "--data", str(path),
              "--out", str(tmp_path / "out"), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "rmtkd: error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_nan_in_pt_data_is_refused(tmp_path, capsys):
    """The tensor path refuses NaN inputs up front too (it used to run to exit 0)."""
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.save(model, tmp_path / "m.pt")
    x = torch.randn(32, 4)
    x[5, 1] = float("nan")
    torch.save({"train": (x, torch.randint(0, 2, (32,)))}, tmp_path / "d.pt")
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d.pt"),
              "--out", str(tmp_path / "out"), "--quiet"])
    assert e.value.code == 2
    assert "NaN" in capsys.readouterr().err


def test_hf_only_flags_are_refused_with_a_torch_model(tmp_path, capsys):
    from torch import nn

    torch.save(nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(tmp_path / "m.pt"), "--data", "x.pt", "--onnx"])
    assert "--onnx" in capsys.readouterr().err


def test_a_causal_lm_directory_goes_to_the_blockwise_job(tmp_path, monkeypatch):
    """compress --model on a *ForCausalLM directory runs compress-llm with the same data."""
    import rmtkd.cli as cli

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "lm"))
    seen = {}
    monkeypatch.setattr(cli, "_run_compress_llm", lambda a: seen.update(vars(a)) or 0)
    assert main(["compress", "--model", str(tmp_path / "lm"), "--data", "text.txt",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert seen["command"] == "compress-llm" and str(seen["text"]) == "text.txt"
    assert str(seen["model"]) == str(tmp_path / "lm") and seen["quiet"]
