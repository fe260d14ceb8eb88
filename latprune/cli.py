"""``latprune``: the command line. Exit status (latprune.errors): 0 success, 1 a bug (its traceback
is shown), 2 bad input (one line naming the fix; a failed write too), 3 the export failed
verification (parity, file size), 4 latency budget missed, 5 accuracy gate failed (the report is
written first in 3-5), 6 ``bench`` timings too noisy for the claim, 130 interrupted."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

from latprune.errors import BadInput, LatpruneError, TooNoisy
from latprune.export.bench import BenchConfig, render, run_bench
from latprune.io import check_writable_file
from latprune.latency_tables.device import cpu_description, gpu_description
from latprune.latency_tables.profile import SAMPLINGS
from latprune.latency_tables.runtimes import PRECISIONS, RUNTIMES, runtime_class
from latprune.latency_tables.runtimes.quantize import CALIBRATION_METHODS
from latprune.latency_tables.store import STORE_NAME, LatencyStore
from latprune.models.registry import available_models
from latprune.pipeline import distributed
from latprune.pipeline.adasap import METHODS, NEURON_SCORES, RHO_NORMS
from latprune.pipeline.config import RunConfig, default_cache_dir, load_config
from latprune.pipeline.importance import DEPRECATED_IMPORTANCE, canonical_importance, importance_names
from latprune.pipeline.run import STOPS, run
from latprune.pipeline.schedule import TARGETS
from latprune.pipeline.sweep import parse_budgets, sweep

__all__ = ["main", "config_from_args"]

COMMANDS = ("run", *STOPS, "export", "sweep")
FP16_RUNTIMES = ", ".join(n for n in RUNTIMES if runtime_class(n).supports_fp16)
INT8_RUNTIMES = ", ".join(n for n in RUNTIMES if runtime_class(n).supports_int8)
PRECISION_HELP = (f"what the deployed model computes in: fp32 (default), fp16 ({FP16_RUNTIMES}) or int8 "
                  f"({INT8_RUNTIMES}: ONNX Runtime's static QDQ quantization, per-channel int8 weights, 8-bit "
                  "activations in the runtime's fast form: uint8 on ort, symmetric int8 for TensorRT)")


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line error: ``latprune run: error: ... (see latprune run --help)``
    and exit 2, like every other bad input (the subcommands' parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("run")
    g.add_argument("--config", help="YAML file with config sections (see README); flags override it")
    g.add_argument("--model", help=f"{', '.join(available_models())} (default resnet20), or package.module:factory")
    g.add_argument("--weights",
                   help="trained dense state_dict (.pt); without it the dense model is pre-trained and cached")
    g.add_argument("--data", help="fashion-mnist (default) or a folder: ImageFolder tree or CIFAR-10/100 python folder")
    g.add_argument("--input-size", type=int, metavar="S",
                   help="`profile` only: build the table for a 3 x S x S input without reading any data (latency "
                        "depends on shapes, not on weights or images): profile on the target device first, train "
                        "elsewhere")
    g.add_argument("--num-classes", type=int, metavar="K",
                   help="with --input-size: the model's number of classes (default 1000)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--budget", type=float,
                   help="latency budget as a fraction of the measured dense latency (default 0.5)")
    b.add_argument("--budget-ms", type=float, help="latency budget in ms per deployment batch")
    g.add_argument("--runtime", choices=RUNTIMES,
                   help="deployment runtime (default ort: ONNX Runtime CPU); the GPU ones are unverified (README)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help=PRECISION_HELP + "; at int8 the tables, the plan and the budget speak int8 latency (the "
                        "budget is a fraction of the dense model's int8 latency), model.int8.onnx is exported and the "
                        "accuracy gates judge it")
    g.add_argument("--fp16", action="store_true", default=None, help="the same as --precision fp16")
    g.add_argument("--calibration", choices=CALIBRATION_METHODS,
                   help="int8: how activation ranges are calibrated (ONNX Runtime's MinMax, Entropy or Percentile; "
                        "default minmax)")
    g.add_argument("--calibration-images", type=int, metavar="N",
                   help="int8: training images the activation ranges are calibrated on (default 512)")
    g.add_argument("--int8-min-top1", type=float, metavar="F",
                   help="int8 parity gate (exit 3): model.int8.onnx must agree with model.onnx on the top-1 class "
                        "of at least F of the test images (default 0.98)")
    g.add_argument("--deploy-batch", type=int, help="batch the budget is measured at (default 32)")
    g.add_argument("--dynamic-batch", action="store_true", default=None,
                   help="export ONNX with a dynamic batch axis (default: static, at --deploy-batch)")
    g.add_argument("--opset", type=int, help="ONNX opset of the exported files (default 17)")
    g.add_argument("--max-accuracy-drop", type=float, metavar="F",
                   help="gate: fail (exit 5) if clean test accuracy drops by more than F (0.01 = one point); "
                        "also the corruption-accuracy gate unless --max-corruption-drop is given. At --precision "
                        "int8 the deployed model.int8.onnx is judged against the dense (fp32) model")
    g.add_argument("--max-corruption-drop", type=float, metavar="F",
                   help="gate: fail (exit 5) if corruption accuracy (mean of 75) drops by more than F")
    g.add_argument("--threads", type=int, help="runtime threads (default 2)")
    g.add_argument("--round-to", type=int, help="keep channel counts multiples of this (default 8)")
    g.add_argument("--importance", choices=[*importance_names(), *DEPRECATED_IMPORTANCE],
                   help="channel value: halp (default: HALP's BatchNorm Taylor value, in units of loss, from the "
                        "training gradients), sensitivity (measured loss increase per group and width, NetAdapt "
                        "style; --sensitivity-passes bounds its cost) or magnitude (L2 of the group's weights, an "
                        "ablation: it maximises kept channels, not accuracy). Deprecated: 'l2' "
                        "(= magnitude), 'taylor' (now means halp)")
    g.add_argument("--sensitivity-passes", type=int,
                   help="--importance sensitivity: most forward passes (of one batch) per estimate of the value; "
                        "over it, every k-th width is measured and the others interpolated (default 1000)")
    g.add_argument("--search", type=int, metavar="N",
                   help="latency target: choose the plan among N candidates that fit the budget (the knapsack's "
                        "plan, the uniform widths, their perturbations), each timed against the dense model; "
                        "those measured under the budget are scored by held-out accuracy after a short fine-tune "
                        "(--search-iters), and the schedule then prunes to the chosen widths (as --floor-widths). "
                        "0: the knapsack's plan alone, through the closed loop (default 24)")
    g.add_argument("--search-iters", type=int,
                   help="--search: SGD iterations each finalist is fine-tuned for before it is scored (default 30)")
    g.add_argument("--method", choices=METHODS,
                   help="optimizer for warm-up, pruning and fine-tuning (default adasap)")
    g.add_argument("--target", choices=TARGETS,
                   help="prune to the latency budget (default; AdaSAP_L, HALP knapsack) or to --param-ratio "
                        "(AdaSAP_P, global magnitude rank)")
    g.add_argument("--param-ratio", type=float, help="with --target params: kept parameters / dense parameters")
    g.add_argument("--checkpoint-every", type=int,
                   help="iterations between training checkpoints (default 50; also at every removal)")
    g.add_argument("--sharpness-rho", type=float,
                   help="radius of the sharpness probe before and after pruning (default 0.05; 0 skips it)")
    g.add_argument("--resume", metavar="DIR",
                   help="continue the killed or finished run in DIR with its own config.json (no other settings)")
    g.add_argument("--warmup-epochs", type=float, help="epochs before the first removal (default 0.5)")
    g.add_argument("--prune-steps", type=int, help="number of removals R (default 10)")
    g.add_argument("--prune-every", type=int, help="iterations between removals (default 30)")
    g.add_argument("--floor-widths", action="store_true", default=None,
                   help="latency target: never cut a group below the plan validated before training (the one-shot "
                        "architecture; only which channels survive is decided later). Default: the knapsack is "
                        "re-solved freely at every removal and the architecture emerges, as in HALP")
    g.add_argument("--emerge", action="store_true", default=None, help=argparse.SUPPRESS)  # the default now
    g.add_argument("--correct-steps", type=int,
                   help="latency target: corrective removals after fine-tuning when the measured model is over "
                        "budget (default 2; 0 only measures)")
    g.add_argument("--rho", type=float, help="uniform SAM/ASAM radius (fine-tuning)")
    g.add_argument("--rho-min", type=float, help="AdaSAP's smallest per-neuron radius")
    g.add_argument("--rho-max", type=float, help="AdaSAP's largest per-neuron radius")
    g.add_argument("--rho-norm", choices=RHO_NORMS,
                   help="adasap: neuron (default): each neuron's perturbation normalised by its own gradient norm "
                        "(eq. 4 read literally: the total grows with sqrt(neurons), hence rho_max 0.1); global: one "
                        "norm over all neurons, the radii acting as weights (use a rho_max near 2.0)")
    g.add_argument("--neuron-score", choices=NEURON_SCORES,
                   help="adasap: what sets each neuron's radius (paper eq. 2, the lowest score gets --rho-max). "
                        "planner (default): the knapsack's own ranking key, the channel's value per millisecond "
                        "its removal saves, so the channels about to be pruned are perturbed most; magnitude or "
                        "taylor: the neuron's weights, L2 or |w.g| (ablations)")
    g.add_argument("--sam-every", type=int, metavar="K",
                   help="sam, asam, adasap: the two-pass step on every K-th iteration, plain steps between "
                        "(default 1: every step; 2 or 4 cut the training cost to about 1.5 or 1.25 x SGD's)")
    g.add_argument("--robust-images", type=int,
                   help="test images for the corruption evaluation, each corrupted 75 ways (default 1000; 0 skips)")
    g.add_argument("--no-bundled-weights", dest="bundled_weights", action="store_false", default=None,
                   help="without --weights, pre-train the dense model here even where the package ships trained "
                        "weights (resnet20 on fashion-mnist)")
    g.add_argument("--pretrain-epochs", type=float, help="dense pre-training epochs when no --weights (default 3)")
    g.add_argument("--finetune-epochs", type=float, help="fine-tuning epochs after pruning (default 2)")
    g.add_argument("--batch-size", type=int, help="training batch size (default 128)")
    g.add_argument("--train-subset", type=int, help="train on the first N training images (0 = all)")
    g.add_argument("--test-subset", type=int, help="report accuracy on the first N test images (0 = all)")
    g.add_argument("--val-size", type=int, help="validation images held out of the training set (default 5000)")
    g.add_argument("--profile-step", type=int, help="latency table grid step in channels (default 8)")
    g.add_argument("--sampling", choices=SAMPLINGS,
                   help="which (c_in, c_out) widths the latency table measures: grid (every pair at "
                        "--profile-step spacing), adaptive (the runtime's step period, a coarse grid, and more "
                        "points only where neighbours disagree beyond noise, the costly layers first: minutes "
                        "instead of hours for wide models) or auto (default: grid up to 1000 entries, else adaptive)")
    g.add_argument("--max-minutes", type=float, metavar="M",
                   help="adaptive sampling: stop refining the table after M minutes (never the coarse pass); "
                        "the layers left coarse are recorded in the table")
    g.add_argument("--profile-round-s", type=float,
                   help="seconds per timing round of a table entry (default 0.02; 10x that per round of the "
                        "end-to-end fit)")
    g.add_argument("--fit-configs", type=int,
                   help="random pruned configurations the table's end-to-end term is fitted on (default 8)")
    g.add_argument("--verify-rounds", type=int,
                   help="interleaved rounds for the final dense/compact timing (default 11)")
    g.add_argument("--verify-round-s", type=float, help="seconds per round of the final timing (default 0.4)")
    g.add_argument("--calibrate-iters", type=int, help="closed-loop re-plans against measured latency (default 4)")
    g.add_argument("--plan-lines", type=int, metavar="N",
                   help="before the closed loop, up to N rounds of: plan, then measure the table's grid lines "
                        "through the planned widths where it only interpolates them (default 3; 0: none)")
    g.add_argument("--calibrate-round-s", type=float,
                   help="seconds per round when the closed loop times a plan against the dense model (default 0.25)")
    g.add_argument("--validate", type=int, metavar="K",
                   help="time K random pruned configurations end to end and store the table's prediction error")
    g.add_argument("--table", help="use this latency table instead of profiling")
    g.add_argument("--force", action="store_true", default=None, help="use a table measured for another setting")
    g.add_argument("--seed", type=int, help="random seed (default 0), recorded in the report")
    g.add_argument("--out", help="run directory (default runs/<model>-<timestamp>); an existing one is resumed")
    g.add_argument("--cache-dir",
                   help="where pre-trained checkpoints and tables are cached (default ~/.cache/latprune)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p = _Parser(prog="latprune", description="Latency-aware pruning of CNNs to a measured budget.")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "run": "the whole pipeline: profile, plan, prune and fine-tune, export, verify, report",
        "profile": "measure the latency table (table.json in the run directory)",
        "plan": "profile if needed, then plan to the budget (plan.json)",
        "prune": "plan if needed, then remove channels and fine-tune (model.pt + arch.json)",
        "export": "all of the above if needed, then ONNX export, parity, timing, report",
        "sweep": "one run per budget (--budgets), sharing the dense model and table; the accuracy-latency front",
    }
    for s in COMMANDS:
        sp = sub.add_parser(s, parents=[common], help=helps[s], description=helps[s])
        if s == "sweep":
            sp.add_argument("--budgets", default="0.3,0.5,0.7",
                            help="comma-separated budget fractions (default 0.3,0.5,0.7)")
    _bench_parser(sub)
    _tables_parser(sub)
    return p


def _tables_parser(sub) -> None:
    h = "inspect, clean and move the per-device latency store (every measured layer entry, shared across models)"
    t = sub.add_parser("tables", help=h, description=h)
    ts = t.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help="the cache holding the store (default ~/.cache/latprune)")
    common.add_argument("--store", help=f"the store file itself (default CACHE_DIR/{STORE_NAME})")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ts.add_parser("list", parents=[common], help="one line per device: entries, layer shapes, noisy entries, age")
    pr = ts.add_parser("prune", parents=[common], help="delete entries (the conditions combine)")
    pr.add_argument("--other-devices", action="store_true", help="entries measured on another CPU or GPU model")
    pr.add_argument("--device", help="entries of the device keys containing this text (see `tables list`)")
    pr.add_argument("--older-than", type=float, metavar="DAYS", help="entries measured more than DAYS ago")
    pr.add_argument("--max-cv", type=float, metavar="CV", help="entries noisier than this CV")
    pr.add_argument("--all", action="store_true", help="every entry")
    ex = ts.add_parser("export", parents=[common], help="write the store's entries to a JSON file")
    ex.add_argument("file")
    ex.add_argument("--this-device", action="store_true", help="only this machine's CPU or GPU model")
    im = ts.add_parser("import", parents=[common], help="merge an exported file into the store")
    im.add_argument("file")
    im.add_argument("--replace", action="store_true", help="imported entries replace those already stored")


def _this_device(key: dict) -> bool:
    return key["device"] in (cpu_description(), gpu_description())


def tables_main(a: argparse.Namespace) -> int:
    path = Path(a.store) if a.store else Path(a.cache_dir or default_cache_dir()).expanduser() / STORE_NAME
    if a.action in ("list", "prune", "export") and not path.exists():
        raise BadInput(f"no latency store at {path}: `latprune profile` creates it (or pass --cache-dir / --store)")
    with LatencyStore(path) as store:
        rows = store.summary()
        if a.action == "list":
            print(f"{path}: {sum(r['entries'] for r in rows)} entries on {len(rows)} device key(s)")
            for r in rows:
                age = (time.time() - r["oldest"]) / 86400
                here = "this machine" if _this_device(r) else "another machine"
                print(f"- {r['device']} ({here}), {r['runtime']} {r['runtime_version']} {r['provider']}, "
                      f"{r['threads']} threads, batch {r['batch']}, {r['dtype']}: {r['entries']} entries over "
                      f"{r['layer_shapes']} layer shapes, {r['noisy_entries']} with CV > 0.1, oldest {age:.1f} days"
                      + (f", step periods {r['periods']}" if r["periods"] else ""))
        elif a.action == "prune":
            if not (a.all or a.other_devices or a.device or a.older_than is not None or a.max_cv is not None):
                raise BadInput("say which entries to delete: --other-devices, --device TEXT, --older-than DAYS, "
                               "--max-cv CV, or --all")
            if a.older_than is not None and not a.older_than >= 0:
                raise BadInput(f"--older-than takes days >= 0, got {a.older_than}")
            devices = None
            if a.other_devices or a.device:
                devices = [r["key"] for r in rows if (not a.other_devices or not _this_device(r))
                           and (not a.device or a.device in r["key"])]
            n = store.prune(devices, None if a.older_than is None else a.older_than * 86400, a.max_cv)
            print(f"deleted {n} entries from {path}")
        elif a.action == "export":
            devices = [r["key"] for r in rows if _this_device(r)] if a.this_device else None
            check_writable_file(a.file, "tables export")
            n = store.export(a.file, devices)
            print(f"wrote {n} entries to {a.file}")
        else:
            n, keys = store.import_(a.file, a.replace)
            here = sum(_this_device(json.loads(k)) for k in keys)
            print(f"imported {n} entries into {path} ({len(keys)} device key(s), {here} of this machine's)")
            if keys and not here:
                print("latprune: note: none of the imported entries were measured on this machine's CPU or GPU "
                      "model; profiles here will not use them", file=sys.stderr)
    return 0


def _bench_parser(sub) -> None:
    h = "time dense against compact interleaved (trtexec-style): percentiles, CV, throughput, speedup interval"
    b = sub.add_parser("bench", help=h, description=h)
    b.add_argument("run_dir", nargs="?", help="directory of a finished run (dense.onnx, model.onnx, weights)")
    b.add_argument("--dense", help="dense ONNX file (instead of a run directory)")
    b.add_argument("--compact", help="compact ONNX file (instead of a run directory)")
    b.add_argument("--runtime", choices=RUNTIMES, default="ort",
                   help="ort (ONNX Runtime CPU, default), torch (eager CPU), trt (TensorRT engines), ort-cuda / "
                        "ort-trt (onnxruntime-gpu providers, IO binding), torch-cuda; the GPU ones are unverified")
    b.add_argument("--warmup", type=float, default=500.0, metavar="MS", help="warm-up per model in ms (default 500)")
    b.add_argument("--iterations", type=int, default=300, help="timed calls per model (default 300)")
    b.add_argument("--batch", type=int, help="batch size (default: the files' batch; others are re-exported)")
    b.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    b.add_argument("--precision", choices=PRECISIONS,
                   help=PRECISION_HELP + "; int8 times a run's dense.int8.onnx and model.int8.onnx (float files are "
                        "quantized first, calibrated on random inputs: latency does not depend on the scales)")
    b.add_argument("--fp16", action="store_true", help="the same as --precision fp16")
    b.add_argument("--block", type=int, default=10, help="calls per model per interleaved block (default 10)")
    b.add_argument("--max-cv", type=float, default=0.25,
                   help="noisy above this per-call coefficient of variation (default 0.25)")
    b.add_argument("--max-ci", type=float, default=0.05,
                   help="noisy above this relative half-width of the speedup's 95%% interval (default 0.05)")
    b.add_argument("--allow-noisy", action="store_true", help="report a noisy result instead of refusing it (exit 6)")
    b.add_argument("--json", help="where to write the JSON (default RUN_DIR/bench-<runtime>-b<batch>.json)")
    b.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    b.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def bench_main(a: argparse.Namespace) -> int:
    if a.run_dir and (a.dense or a.compact):
        raise BadInput("give a run directory or --dense/--compact files, not both")
    cfg = BenchConfig(runtime=a.runtime, batch=a.batch, threads=a.threads, fp16=a.fp16, precision=a.precision,
                      warmup_ms=a.warmup,
                      iterations=a.iterations, block=a.block, max_cv=a.max_cv, max_ci=a.max_ci,
                      allow_noisy=a.allow_noisy, seed=a.seed)
    r = run_bench(cfg, a.run_dir, a.dense, a.compact, a.json)
    print(render(r), file=sys.stderr)
    print(r["json"])
    if r["noisy"] and not cfg.allow_noisy:
        raise TooNoisy("the timings are too noisy to support this speedup (see NOISY above): quieten the machine, "
                       "raise --iterations, or pass --allow-noisy to report it anyway")
    return 0


_RESUME_OK = {"command", "resume", "no_progress", "verbose", "force"}


def config_from_args(a: argparse.Namespace) -> RunConfig:
    if a.resume:
        extra = sorted(k for k, v in vars(a).items() if v not in (None, False) and k not in _RESUME_OK)
        if extra:
            raise BadInput(f"--resume takes the settings from {a.resume}/config.json: drop --"
                           f"{extra[0].replace('_', '-')} (or start a new run with --out)")
        path = Path(a.resume) / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise BadInput(f"{a.resume} has no config.json: pass the directory of a latprune run to --resume") from None
        except json.JSONDecodeError:
            raise BadInput(f"{path} is corrupted: start a new run with --out instead of --resume") from None
        return RunConfig.from_dict(d).with_overrides(out=str(a.resume), progress=False if a.no_progress else None,
                                                     force=a.force)
    if a.target == "params" and (a.budget is not None or a.budget_ms is not None):
        raise BadInput("--target params prunes to --param-ratio, not to a latency budget: drop --budget/--budget-ms")
    cfg = load_config(a.config)
    importance = None if a.importance is None else canonical_importance(a.importance)  # warns for old names
    budget = {}
    if a.budget is not None:
        budget = {"fraction": a.budget, "ms": None}
    elif a.budget_ms is not None:
        budget = {"ms": a.budget_ms}
    budget["calibrate_iters"] = a.calibrate_iters
    budget["plan_lines"] = a.plan_lines
    budget["calibrate_round_s"] = a.calibrate_round_s
    return cfg.with_overrides(
        model=a.model, weights=a.weights, bundled_weights=a.bundled_weights, seed=a.seed, out=a.out, table=a.table,
        force=a.force,
        cache_dir=a.cache_dir, progress=False if a.no_progress else None,
        data={"name": a.data, "train_subset": a.train_subset, "test_subset": a.test_subset, "val_size": a.val_size,
              "input_size": a.input_size, "num_classes": a.num_classes},
        deploy={"runtime": a.runtime, "batch": a.deploy_batch, "threads": a.threads, "precision": a.precision,
                "fp16": a.fp16 if a.fp16 or a.precision is None else a.precision == "fp16",
                "calibration": a.calibration, "calibration_images": a.calibration_images,
                "int8_min_top1": a.int8_min_top1, "dynamic_batch": a.dynamic_batch, "opset": a.opset},
        gates={"max_accuracy_drop": a.max_accuracy_drop, "max_corruption_drop": a.max_corruption_drop},
        budget=budget,
        plan={"round_to": a.round_to, "importance": importance, "sensitivity_passes": a.sensitivity_passes,
              "search_candidates": a.search, "search_iters": a.search_iters},
        profile={"step": a.profile_step, "min_round_s": a.profile_round_s, "validate": a.validate,
                 "fit_configs": a.fit_configs, "sampling": a.sampling, "max_minutes": a.max_minutes},
        pretrain={"epochs": a.pretrain_epochs, "batch_size": a.batch_size},
        finetune={"epochs": a.finetune_epochs, "batch_size": a.batch_size},
        schedule={"warmup_epochs": a.warmup_epochs, "prune_steps": a.prune_steps, "prune_every": a.prune_every,
                  "width_floor": a.floor_widths, "correct_steps": a.correct_steps,
                  "target": a.target, "param_ratio": a.param_ratio, "checkpoint_every": a.checkpoint_every,
                  "sharpness_rho": a.sharpness_rho},
        robustness={"images": a.robust_images},
        optimizer={"method": a.method, "rho": a.rho, "rho_min": a.rho_min, "rho_max": a.rho_max,
                   "score": a.neuron_score, "sam_every": a.sam_every, "normalize": a.rho_norm},
        verify={"rounds": a.verify_rounds, "min_round_s": a.verify_round_s},
    )


def main(argv: list[str] | None = None) -> int:
    """The CLI's error boundary. A :class:`LatpruneError` (bad input, a failed gate) is one line on
    stderr and its exit status (``-v`` adds the traceback); anything else is a bug in latprune or a
    library under it: its traceback, one line saying so, and exit 1. Bad flags exit 2 in one line."""
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # third-party notices
    warnings.filterwarnings("default", category=DeprecationWarning, module="latprune")  # our deprecated aliases
    try:
        return _command(a)
    except LatpruneError as e:
        if a.verbose:
            traceback.print_exc()
        print(f"latprune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("latprune: interrupted; run again with the same --out to resume", file=sys.stderr)
        return 130
    except Exception as e:  # not an input latprune knows to be bad: a bug, shown as one
        traceback.print_exc()
        print(f"latprune: internal error ({type(e).__name__}), a bug rather than bad input: please report it "
              "with the traceback above; the same command resumes the run", file=sys.stderr)
        return 1


def _command(a: argparse.Namespace) -> int:
    if a.command == "bench":
        return bench_main(a)
    if a.command == "tables":
        return tables_main(a)
    cfg = config_from_args(a)
    if a.command == "sweep":
        res = sweep(cfg, parse_budgets(a.budgets))
        print(res.path)
        return res.exit_code
    distributed.init_from_env()  # under torchrun: join the process group (data-parallel training)
    result = run(cfg, stop_after=a.command if a.command in STOPS else None)
    if a.command in STOPS:
        v = result.validation
        if v:
            print(f"table prediction error on {v['k']} random pruned configurations: median "
                  f"{100 * v['median_rel_err']:.1f} %, p90 {100 * v['p90_rel_err']:.1f} %", file=sys.stderr)
        print(result.artifact)
        return 0
    r = result.report
    if r is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    _print_summary(r)
    for g in result.failed_gates:
        print(f"latprune: gate '{g['name']}' FAILED: {g['detail']}", file=sys.stderr)
    print(result.report_path)
    return result.exit_code


def _print_summary(r: dict) -> None:
    b, status = r["budget"], ("met" if r["budget"]["met"] else "MISSED")
    goal = (f"parameter ratio {b['achieved_param_ratio']:.3f} vs {b['param_ratio']:.3f} {status}: "
            if b.get("target") == "params" else f"budget {status}: ")
    print(f"{goal}compact {r['compact']['latency_ms']:.3f} ms"
          + (f" vs target {b['target_ms']:.3f} ms" if b.get("target_ms") is not None else "")
          + f" (dense {r['dense']['latency_ms']:.3f} ms), speedup {r['speedup']:.2f}x, "
          f"accuracy {r['dense']['accuracy']:.4f} -> {r['compact']['accuracy']:.4f}"
          + (f" (model.int8.onnx {r['int8']['compact']['accuracy']:.4f})" if r.get("int8") else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
