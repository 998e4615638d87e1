"""Saved Hugging Face models load with ``transformers`` alone (``trust_remote_code=True``).

Tiny random BERT (sequence classifier, bare encoder), Llama (tied embeddings) and Qwen2
(q/k/v biases) models get real reductions (narrow MLPs, per-head value widths ->
HeadPaddedLinear / HeadSelectLinear, ProjectedLinear, biases added by mean corrections) and
are saved with ``rmtkd.save`` (plus one decoder written by the block-wise writer of
``rmtkd.llm.hfdir``). ONE subprocess, in which importing rmtkd raises ImportError, loads
every directory with its Auto class and runs fixed inputs; its outputs must equal those of
``rmtkd.load`` (atol 1e-5, float32), with the same module types and parameter count as the
reduced model (so it really is the reduced structure), no missing / unexpected keys, tied
embeddings still tied, and ``AutoTokenizer`` working on the copied tokenizer files.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, BertModel,  # noqa: E402
                          BertTokenizerFast, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import rmtkd  # noqa: E402
from rmtkd.adapters import block_modules  # noqa: E402
from rmtkd.hf.export import MODELING_FILE, copy_tokenizer, remote_code_config  # noqa: E402
from rmtkd.reduce import (Reduction, cut_mlp, cut_values, head_reduction,  # noqa: E402
                          project_block_linear, record_widths, reduce_site)

H, HEADS, KV, HD, FF, L, VOCAB = 32, 4, 2, 8, 64, 2, 100
REPO = Path(__file__).resolve().parents[1]
TEXT = "hello world rmtkd"


# ----------------------------------------------------------------------------- models

def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def orth(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


def bert(cls):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                     intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cls(cfg).eval()


def reduce_bert(model):
    """Layer 0: MLP width 16 and value dims [2, 3, 0, 5] per head; layer 1: head size 5,
    then the MLP output and the attention output projected (ranks 9, 10); the token
    embedding at rank 12."""
    from rmtkd.capture import make_site
    from rmtkd.reduce.attention import head_statistics, head_width_reduction
    from rmtkd.reduce.transformer import block_of

    p = block_modules(model)[0][0].rpartition(".")[0]
    g = torch.Generator().manual_seed(7)
    A = torch.randn(H, H, generator=g, dtype=torch.float64)
    emb = p.replace("encoder.layer", "embeddings.word_embeddings")
    mean = model.get_submodule(emb).weight.detach().double().mean(0)
    block = model.get_submodule(f"{p}.1")
    query = f"{p}.1.attention.self.query"
    heads = head_width_reduction(make_site(query, model.get_submodule(query)), head_statistics(
        block, block_of(block)[1], torch.randn(H, generator=g, dtype=torch.float64), A @ A.T),
        5)
    for red in (Reduction("e", emb, "width", H, 12, orth(H, 12, 4), mean), heads,
Reduction("a", f"{p}.0.output.dense", "width", FF, 16, orth(FF, 16, 1),
                          torch.randn(FF, generator=g)),
                head_reduction("b", f"{p}.0.attention.output.dense", A @ A.T, HEADS,
                               [2, 3, 0, 5], mean=torch.randn(H, generator=g)),
                Reduction("c", f"{p}.1.output.dense", "project", FF, 9, orth(FF, 9, 2),
                          torch.randn(FF, generator=g)),
                Reduction("d", f"{p}.1.attention.output.dense", "project", HEADS * 5, 10,
                          orth(HEADS * 5, 10, 3))):
        assert reduce_site(model, red).applied
    return model.eval()


def decoder(kind):
    torch.manual_seed(0)
    kw = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
              num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
              max_position_embeddings=64, initializer_range=0.1)
    if kind == "llama":   # tied embeddings, no biases anywhere
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw)).eval()  # qkv bias


def spd(d, g):
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64)


def reduce_decoder(model):
    """Per layer: value dims per kv head and the gated-MLP width (both with means: biases
    added to o_proj / down_proj); layer 1's q_proj and layer 0's k_proj projected."""
    g = torch.Generator().manual_seed(3)
    layers = [m for _, m in block_modules(model)]
    for i, layer in enumerate(layers):
        cut_values(layer, torch.randn(KV * HD, generator=g, dtype=torch.float64),
                   spd(KV * HD, g), [3, 5] if i == 0 else [8, 2])
        cut_mlp(layer, torch.randn(FF, generator=g, dtype=torch.float64), spd(FF, g),
                24 + 8 * i)
    project_block_linear(layers[1], "self_attn.q_proj", orth(H, 12, 5).float(),
                         mean=torch.full((H,), 0.1, dtype=torch.float64))
    project_block_linear(layers[0], "self_attn.k_proj", orth(H, 10, 6).float())
    return model.eval()


# ----------------------------------------------------------------------------- subprocess

SCRIPT = r'''
import importlib.abc, json, os, sys, traceback


class NoRmtkd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rmtkd" or name.startswith("rmtkd."):
            raise ImportError(f"rmtkd is not importable in this process ({name})")
        return None


sys.meta_path.insert(0, NoRmtkd())
repo = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo]
for k in [k for k in sys.modules if k == "rmtkd" or k.startswith("rmtkd.")]:
    del sys.modules[k]
try:
    import rmtkd  # noqa: F401
    raise SystemExit("rmtkd is still importable")
except ImportError:
    pass

import torch
import transformers
from safetensors.torch import load_file, save_file

for job in json.loads(open(sys.argv[2]).read()):
    meta = {}
    try:
        model, info = getattr(transformers, job["auto"]).from_pretrained(
            job["dir"], trust_remote_code=True, output_loading_info=True)
        model.eval()
        x = load_file(job["inputs"])
        with torch.no_grad():
            o = model(**x)
            tensors = {k: v.contiguous() for k, v in o.items() if isinstance(v, torch.Tensor)}
            if job["auto"] == "AutoModelForCausalLM":
                tensors["generated"] = model.generate(x["input_ids"], max_new_tokens=4,
                                                      do_sample=False, pad_token_id=0)
                meta["tied"] = (model.get_output_embeddings().weight.data_ptr()
                                == model.get_input_embeddings().weight.data_ptr())
        meta.update({
            "class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "missing": sorted(map(str, info["missing_keys"])),
            "unexpected": sorted(map(str, info["unexpected_keys"])),
            "mismatched": sorted(map(str, info["mismatched_keys"])),
            "modules": {n: type(m).__name__ for n, m in model.named_modules() if n}})
        if job.get("text"):
            tok = transformers.AutoTokenizer.from_pretrained(job["dir"])
            meta["token_ids"] = tok(job["text"])["input_ids"]
        save_file(tensors, job["result"] + ".safetensors")
    except Exception:
        meta["error"] = traceback.format_exc()
    meta["rmtkd_imported"] = any(k == "rmtkd" or k.startswith("rmtkd.") for k in sys.modules)
    with open(job["result"] + ".json", "w") as f:
        json.dump(meta, f)
'''


def encoder_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def decoder_inputs():
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}


def tokenizer_dir(root: Path) -> tuple[Path, list[int]]:
    vocab = root / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "rm", "##tk",
         "##d"]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab / "vocab.txt"))
    out = root / "tokenizer"
    tok.save_pretrained(str(out))
    return out, tok(TEXT)["input_ids"]


def blockwise_dir(model, out: Path) -> None:
    """The model written as the block-wise path writes its output (config_dict +
    write_model from one shard)."""
    from rmtkd.llm.hfdir import WeightSource, config_dict, write_model, write_shard

    widths = record_widths(model)
    cfg = config_dict(WeightSource.from_model(model), widths, torch.float32)
    shards = out.parent / f"{out.name}-shards"
    shards.mkdir()
    state = {k: v for k, v in model.state_dict().items()
             if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}
    write_shard(shards / "model-00001-of-00001.safetensors", state)
    out.mkdir()
    write_model(out, shards, ["model-00001-of-00001.safetensors"], cfg, {})


CASES = {
    "bert-seqcls": (lambda: reduce_bert(bert(BertForSequenceClassification)),
                    "AutoModelForSequenceClassification", encoder_inputs),
    "bert-model": (lambda: reduce_bert(bert(BertModel)), "AutoModel", encoder_inputs),
    "llama-tied": (lambda: reduce_decoder(decoder("llama")), "AutoModelForCausalLM",
                   decoder_inputs),
    "qwen2": (lambda: reduce_decoder(decoder("qwen2")), "AutoModelForCausalLM",
              decoder_inputs),
    "llama-blockwise": (lambda: reduce_decoder(decoder("llama")), "AutoModelForCausalLM",
                        decoder_inputs),
}


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Save every case, load them all in one rmtkd-free subprocess; per case the reduced
    model, its directory, the subprocess's metadata and outputs."""
    root = tmp_path_factory.mktemp("remote")
    tok_dir, token_ids = tokenizer_dir(root)
    jobs, cases = [], {}
    for name, (make, auto, inputs) in CASES.items():
        model = make()
        out = root / name
        if name == "llama-blockwise":
            blockwise_dir(model, out)
        else:
            rmtkd.save(model, out, tokenizer_dir=tok_dir if name == "bert-seqcls" else None)
        x = inputs()
        save_file(x, str(root / f"{name}.inputs.safetensors"))
        jobs.append({"dir": str(out), "auto": auto, "inputs": str(root / f"{name}.inputs"
                                                                   ".safetensors"),
                     "result": str(root / f"{name}.result"),
                     "text": TEXT if name == "bert-seqcls" else None})
        cases[name] = {"model": model, "dir": out, "inputs": x}
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(root / "jobs.json")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name, c in cases.items():
        c["meta"] = json.loads((root / f"{name}.result.json").read_text())
        if "error" not in c["meta"]:
            c["out"] = load_file(str(root / f"{name}.result.safetensors"))
    c = cases["bert-seqcls"]
    c["token_ids"] = token_ids
    return cases


@pytest.mark.parametrize("name", list(CASES))
def test_loads_without_rmtkd(remote, name):
    c = remote[name]
    meta = c["meta"]
    assert "error" not in meta, meta["error"]
    assert not meta["rmtkd_imported"]
    assert (c["dir"] / MODELING_FILE).is_file()
    cfg = json.loads((c["dir"] / "config.json").read_text())
    base = type(c["model"]).__name__
    assert cfg["model_type"] == c["model"].config.model_type
    assert CASES[name][1] in cfg["auto_map"]
    assert meta["class"] == "Rmtkd" + base
    assert meta["missing"] == meta["unexpected"] == meta["mismatched"] == []

    # the same structure as the reduced model (and as rmtkd.load's)
    loaded = rmtkd.load(c["dir"])
    assert type(loaded).__name__ == base
    types = {n: type(m).__name__ for n, m in loaded.named_modules() if n}
    assert meta["modules"] == types == {n: type(m).__name__
                                        for n, m in c["model"].named_modules() if n}
    assert meta["params"] == count(c["model"]) == count(loaded)
    assert meta["params"] < count(_unreduced(name))
    assert {"HeadPaddedLinear", "HeadSelectLinear", "ProjectedLinear"} <= set(types.values())

    # the same outputs
    with torch.no_grad():
        ref = loaded(**c["inputs"])
        mine = c["model"](**c["inputs"])
    keys = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
    assert keys and set(keys) <= set(c["out"])
    for k in keys:
        assert ref[k].dtype == torch.float32
        torch.testing.assert_close(c["out"][k], ref[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=1e-5)
    if CASES[name][1] == "AutoModelForCausalLM":
        with torch.no_grad():
            gen = loaded.generate(c["inputs"]["input_ids"], max_new_tokens=4,
                                  do_sample=False, pad_token_id=0)
        assert torch.equal(c["out"]["generated"], gen)
        assert meta["tied"] == bool(c["model"].config.tie_word_embeddings)


def _unreduced(name):
    return {"bert-seqcls": lambda: bert(BertForSequenceClassification),
            "bert-model": lambda: bert(BertModel),
            "llama-tied": lambda: decoder("llama"), "qwen2": lambda: decoder("qwen2"),
            "llama-blockwise": lambda: decoder("llama")}[name]()


def test_added_biases_and_qkv_biases_are_rebuilt(remote):
    """Mean corrections added biases where the decoders had none; Qwen2 keeps its q/k/v
    biases (k_proj projected with its bias)."""
    for name in ("llama-tied", "qwen2"):
        widths = json.loads((remote[name]["dir"] / "config.json").read_text())["rmtkd_blocks"]
        assert all(w["biases"]["mlp.down_proj"] and w["biases"]["self_attn.o_proj"]
                   for w in widths)
        assert widths[1]["biases"]["self_attn.q_proj"]   # added by the projection's mean
        assert widths[0]["ranks"] == {"self_attn.k_proj": 10}
    qwen = json.loads((remote["qwen2"]["dir"] / "config.json").read_text())["rmtkd_blocks"]
    llama = json.loads((remote["llama-tied"]["dir"] / "config.json").read_text())[
        "rmtkd_blocks"]
    assert qwen[0]["biases"]["self_attn.k_proj"] and not llama[0]["biases"]["self_attn.k_proj"]


def test_tokenizer_copied_and_loads(remote):
    c = remote["bert-seqcls"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in c["dir"].iterdir()}
    assert c["meta"]["token_ids"] == c["token_ids"]
    assert len(c["token_ids"]) > 2


def test_layout_record_names_the_blocks(tmp_path):
    model = reduce_decoder(decoder("qwen2"))
    extra = remote_code_config(model)
    lay = extra["rmtkd_layout"]
    assert extra["auto_map"] == {"AutoModelForCausalLM": "modeling_rmtkd.RmtkdQwen2ForCausalLM"}
    assert lay["container"] == "model.layers" and len(lay["blocks"]) == L
    b = lay["blocks"][0]
    assert b["path"] == "model.layers.0" and (b["heads"], b["kv_heads"], b["head_dim"],
                                              b["group"]) == (HEADS, KV, HD, HEADS // KV)
    assert b["mlp_producers"] == ["mlp.gate_proj", "mlp.up_proj"]
    assert b["mlp_width_attrs"] == ["mlp.intermediate_size"]
    assert json.loads(json.dumps(lay)) == lay
    # the module's intermediate_size follows the cut, in rmtkd and after a rebuild
    assert model.model.layers[0].mlp.intermediate_size == 24
    rmtkd.save(model, tmp_path / "m")
    loaded = rmtkd.load(tmp_path / "m")
    assert [m.mlp.intermediate_size for m in loaded.model.layers] == [24, 32]


def test_modeling_file_is_standalone():
    src = (REPO / "rmtkd" / "hf" / MODELING_FILE).read_text()
    assert "rmtkd." not in "".join(line for line in src.splitlines()
                                   if line.lstrip().startswith(("import ", "from ")))
    from transformers.dynamic_module_utils import get_imports

    imports = set(get_imports(str(REPO / "rmtkd" / "hf" / MODELING_FILE)))
    assert imports - set(sys.stdlib_module_names) == {"torch", "transformers"}


def test_tokenizer_errors_and_auto_map(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        copy_tokenizer(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        rmtkd.save(bert(BertModel), tmp_path / "m", tokenizer_dir=tmp_path / "empty")
    assert not (tmp_path / "m").exists()
    out = rmtkd.save(bert(BertModel), tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoModel": "modeling_rmtkd.RmtkdBertModel"}
