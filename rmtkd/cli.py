"""Command line: ``rmtkd analyze`` and ``rmtkd compress``.

    rmtkd analyze --example digits-mlp [--out DIR]
    rmtkd analyze --model model.pt --data data.npy [--out DIR] [--sites 'blocks.*.fc2']
    rmtkd compress --example digits-mlp [--mode width|project] [--out DIR] [--epsilon E]

Errors the user can fix print one line ``rmtkd: error: ...`` to stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

DATA_SUFFIXES = (".pt", ".pth", ".npy")


class UsageError(Exception):
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
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (example training, solver)")

    from .compress import CompressConfig

    c = sub.add_parser("compress", help="compress a model with RMT-KD: reduce each site to its "
                       "spikes, shallow to deep, with self-distillation after each step",
                       description="Causal RMT-KD: for each site, calibrate, keep the spike "
                       "directions above the Marchenko-Pastur edge, cut the layer, distil from "
                       "the model as it was before the step; a step that costs more than "
                       "--epsilon accuracy points is rolled back. Writes a report directory.")
    c.add_argument("--example", metavar="NAME", required=True,
                   help="a built-in example (teacher trained here, labelled data): digits-mlp "
                   "(--model/--data jobs come later)")
    c.add_argument("--mode", default="width", choices=("width", "project"),
                   help="width: narrower dense layers (the paper's); project: low-rank "
                   "ProjectedLinear consumers (default: width)")
    c.add_argument("--out", metavar="DIR", type=Path,
                   help="report directory (default: reports/<example>-compress)")
    c.add_argument("--epsilon", type=float, default=CompressConfig.epsilon,
                   help="largest accuracy drop in points against the original model before "
                   f"a step is rolled back (default {CompressConfig.epsilon})")
    c.add_argument("--estimator", default="auto", choices=("auto", *ESTIMATORS),
                   help="noise-level estimator (default: auto)")
    c.add_argument("--margin", type=_margin, default=DEFAULT_MARGIN,
                   help="threshold = lambda_+ (1 + margin), or 'tw' / 'tw:<p>' "
                   f"(default {DEFAULT_MARGIN!r}; 0 is the paper's plain lambda_+)")
    c.add_argument("--solver", default="auto", choices=SOLVERS, help="eigen solver")
    c.add_argument("--quiet", action="store_true", help="no progress bars and no step table")
    c.add_argument("--force", action="store_true", help="replace an existing report directory")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted job from its last finished step (the "
                   "checkpoint kept in .<DIR>.checkpoint next to --out DIR; same arguments)")
    c.add_argument("--seed", type=int, default=0,
                   help="random seed (example training, calibration subset, distillation)")
    return parser


def _load_model(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot unpickle the model in {path} ({e}); the module that defines "
                         f"its class must be importable (check PYTHONPATH)") from e
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UsageError(f"cannot read the model file {path}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        hint = " (a state_dict?)" if isinstance(model, dict) else ""
        raise UsageError(f"{path} holds a {type(model).__name__}{hint}, not a torch.nn.Module; "
                         f"save the whole module with torch.save(model, path)")
    return model


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


def _batches(files: list[Path], batch_size: int, dtype: torch.dtype) -> Iterator[Any]:
    """Stream the files as batches along dim 0; float data is cast to the model's dtype."""
    for f in files:
        obj = _load_array(f)
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        if isinstance(obj, dict):
            n = len(obj["input_ids"])
            for i in range(0, n, batch_size):
                yield {k: cast(v[i:i + batch_size]) for k, v in obj.items()}
        else:
            yield from (cast(b) for b in obj.split(batch_size))


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_model
    from .report import format_table, write_analysis_report

    torch.manual_seed(args.seed)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
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
        model = _load_model(args.model)
        files = _data_files(args.data)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)
        batches = _batches(files, args.batch_size, dtype)
        meta = {"model": str(args.model), "data": str(args.data),
                "data_files": len(files), "batch_size": args.batch_size}
        stem = args.model.stem
    out = args.out if args.out is not None else Path("reports") / stem
    if out.exists() and not args.force:
        # Checked before the (possibly long) calibration; the writer checks again.
        raise UsageError(f"{out} already exists; pass --force to replace it")
    fits = analyze_model(model, batches, sites=args.sites, estimator=args.estimator,
                         margin=args.margin, solver=args.solver,
                         acc_dtype=getattr(torch, args.acc_dtype), progress=not args.quiet)
    meta.update(estimator=args.estimator, margin=args.margin, solver=args.solver,
                acc_dtype=args.acc_dtype, seed=args.seed, sites=list(fits))
    path = write_analysis_report(out, fits, meta=meta, force=args.force)
    if not args.quiet:
        print(format_table(fits))
    print(f"report: {path / 'index.md'}")
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    from .compress import CompressConfig, compress, format_history, latency_ms
    from .compress import write_compress_report
    from .examples import EXAMPLE_DATA

    torch.manual_seed(args.seed)
    if args.example not in EXAMPLE_DATA:
        raise UsageError(f"unknown example {args.example!r}; available: "
                         f"{', '.join(EXAMPLE_DATA)}")
    out = args.out if args.out is not None else Path("reports") / f"{args.example}-compress"
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    quiet = args.quiet
    ckpt = _checkpoint_dir(out)
    model, meta = _example_teacher(args, ckpt)
    train, evals = EXAMPLE_DATA[args.example](seed=args.seed)
    config = CompressConfig(mode=args.mode, estimator=args.estimator, margin=args.margin,
                            solver=args.solver, epsilon=args.epsilon, seed=args.seed,
                            progress=not quiet)
    import time

    t0 = time.perf_counter()
    result = compress(model, train, eval_data=evals, config=config,
                      checkpoint_dir=ckpt / "steps", resume=args.resume)
    seconds = time.perf_counter() - t0
    example = next(iter(evals))[0][:1]
    lat_before = latency_ms(model, example)
    lat_after = latency_ms(result.model, example)
    summary = {
        "parameters": f"{result.original_params:,} -> {result.final_params:,} "
                      f"({100 * result.reduction:.1f}% fewer)",
        result.metric_name + " (held-out)":
            f"{result.original_metric:.2f} -> {result.final_metric:.2f} "
            f"({result.final_metric - result.original_metric:+.2f} points)",
        "CPU latency, batch 1 (median of 200)":
            f"{lat_before:.4f} ms -> {lat_after:.4f} ms ({lat_before / lat_after:.2f}x)",
        "steps": f"{len(result.history)} tried: " + ", ".join(
            f"{r.site} {r.status}" for r in result.history),
        "compression time": f"{seconds:.1f} s",
    }
    n_calib = next(iter(result.fits.values())).n if result.fits else 0
    meta["calibration"] = (f"seeded {config.calib_fraction:.0%} subset of the training set "
                           f"({n_calib} samples), the same at every step")
    meta["evaluation"] = ("held-out test split; it also decides the epsilon roll-backs "
                          "(no separate validation split yet)")
    meta.update(mode=args.mode, estimator=args.estimator, margin=args.margin,
                solver=args.solver, epsilon=args.epsilon, seed=args.seed,
                threads=torch.get_num_threads())
    summary_json = {**summary, "original_params": result.original_params,
                    "final_params": result.final_params, "reduction": result.reduction,
                    "original_metric": result.original_metric,
                    "final_metric": result.final_metric, "latency_ms_before": lat_before,
                    "latency_ms_after": lat_after, "seconds": seconds}
    path = write_compress_report(out, result, meta=meta, summary=summary_json,
                                 force=args.force)
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)   # the job is complete
    if not quiet:
        print(format_history(result.history))
        print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"report: {path / 'index.md'}")
    return 0


def _checkpoint_dir(out: Path) -> Path:
    """Where ``rmtkd compress --out DIR`` keeps its checkpoint: ``.DIR.checkpoint`` beside
    DIR (DIR itself is written atomically at the end, so it cannot hold it)."""
    return out.parent / f".{out.name}.checkpoint"


def _example_teacher(args: argparse.Namespace, ckpt: Path) -> tuple[torch.nn.Module, dict]:
    """The example's trained teacher and metadata. The teacher is kept in the checkpoint
    (``ckpt/teacher`` in the rmtkd.save format, ``ckpt/job.json``) so that ``--resume``
    does not train it again; without --resume an old checkpoint is discarded."""
    import json
    import os
    import shutil

    from .examples import EXAMPLES
    from .io import load, save

    job = {"example": args.example, "seed": args.seed}
    if args.resume and (ckpt / "job.json").is_file() and (ckpt / "teacher").is_dir():
        saved = json.loads((ckpt / "job.json").read_text())
        if saved.get("job") != job:
            raise UsageError(f"cannot --resume: the checkpoint {ckpt} belongs to a job with "
                             f"{saved.get('job')}, not {job}; drop --resume to start afresh")
        return load(ckpt / "teacher"), saved["meta"]
    if args.resume and not args.quiet:
        print(f"rmtkd: no checkpoint in {ckpt}; starting from the beginning", file=sys.stderr)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    model, _, meta = EXAMPLES[args.example](seed=args.seed, progress=not args.quiet)
    ckpt.mkdir(parents=True)
    save(model, ckpt / "teacher")
    tmp = ckpt / ".job.json.tmp"
    tmp.write_text(json.dumps({"job": job, "meta": meta}, default=str))
    os.replace(tmp, ckpt / "job.json")
    return model, meta


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rmtkd`` console script; returns 0 or exits with code 2."""
    from .capture import CalibrationError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _run_compress(args)
        return _run_analyze(args)
    except (UsageError, CalibrationError, ValueError, FileNotFoundError,
            FileExistsError) as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"rmtkd: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
