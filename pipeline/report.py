"""Stage 5: the run's report, ``report.json`` (schema below), ``report.md`` and its plots.

report.json, ``schema_version`` 6 (6: ``int8``, and the ``int8_parity`` gate;
3: ``training.emerging``, ``training.corrections``,
``training.corrected_e2e`` and each removal's ``predicted_ratio`` / ``measured_ratio``; the default
planner became the emerging ``halp`` schedule. 4: ``plan.search``, ``training.searched``. 5:
``robustness.informative`` and ``informative_acc``; ``training.phases`` carry their ``lr_span``).
Units: latencies in milliseconds per batch of ``runtime.batch`` images (medians of dense and
compact timed interleaved in one process); accuracies are fractions in [0, 1]; sizes in bytes.
Since the layered layout (issue 10) the importance criterion reads ``magnitude`` where older
schema-2 reports said ``l2`` (README, "Migration note").

- ``model``, ``data``, ``seed``: what was pruned, on what, with which seed.
- ``budget``: ``target`` ("latency" or "params"); latency: ``fraction`` of the measured dense
  latency, ``target_ms``, ``requested_ms`` (``--budget-ms`` or null), ``met`` =
  ``compact.latency_ms <= target_ms``; params (AdaSAP_P): ``param_ratio`` requested,
  ``achieved_param_ratio``, ``met``, ``target_ms`` null.
- ``dense`` / ``compact``: ``latency_ms`` (dense: the median of its calls; compact: the dense
  median x the median over interleaved rounds of compact / dense round medians, so drift between
  rounds and sessions cancels; ``compact.latency_pooled_median_ms`` is the plain median of its
  calls), ``latency_p90_ms``, ``cv`` (of per-round medians),
  ``predicted_ms`` (the table's prediction), ``accuracy`` (test set), ``params``, ``macs`` (per
  image), ``channels`` (output channels per conv/linear layer); dense: ``pretrain``; compact:
  ``predicted_ratio``.
- ``speedup`` = dense.latency_ms / compact.latency_ms (the paired per-round ratio);
  ``speedup_ci95`` [lo, hi], bootstrap over rounds; ``verify``: ``pair_ratios`` (compact/dense of each
  pair of sessions), ``timing``.
- ``gates``: list of {``name``, ``ok``, ``detail``, and for thresholds ``limit`` and ``value``},
  in order: ``parity``, ``onnx_shrink``, [``int8_parity``], [``tensorrt_parity``], ``latency`` or
  ``params``, [``accuracy``], [``corruption_accuracy``] (drops are dense minus compact; at int8,
  dense minus the int8 compact file). The exit status is the first failed gate's (3, 3, 3, 3, 4, 5, 5).
- ``parity``: ``ok``, ``failed_output`` (name or null), ``max_abs_diff``, ``top1_agreement``,
  ``images``, ``batches``, ``atol``, ``rtol``, ``min_top1``, ``reference``, ``runtime``,
  ``outputs`` (per output: ``name``, ``max_abs_diff``, ``max_rel_diff``, ``worst_excess``,
  ``top1_agreement``, ``ok``), ``detail`` (one sentence).
- ``onnx``: ``dense`` / ``compact`` (``file``, ``opset``, ``input_shape``, ``dynamic_batch``,
  ``size_bytes``, ``sha256``), ``shrink`` (``ok``, ``ratio``, sizes, parameter counts),
  ``contract`` (the preprocessing contract also stored in the files' metadata).
- ``tensorrt``: null unless ``--runtime trt``: ``engines`` (per engine ``file``, ``layers``,
  ``size_bytes``, ``build_s``, ``fp16``, ``opt_level``, ``timing_cache``), ``parity`` (as above,
  against ONNX Runtime), ``latency`` (per engine ``gpu_compute`` and ``end_to_end`` per-call
  statistics of ``latency_tables.timing.latency_stats``: ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``,
  ``std_ms``, ``min_ms``, ``max_ms``, ``cv``, ``count``; before this layout they said ``median_ms`` for
  ``p50_ms``: the path has never run on a GPU, so no report with the old keys exists),
  ``verified_on_gpu`` (false until the path has run on a GPU), ``note``.
- ``layer_latency``: per profiled layer of the compact model: ``layer``, ``c_in``, ``c_out``,
  ``dense_c_in``, ``dense_c_out``, ``predicted_ms`` (table at the compact widths),
  ``measured_ms`` (the layer alone, now), ``dense_predicted_ms``, ``cv``.
- ``why_not_faster``: ``hardware_multiple``, ``off_grid`` (``layer``, ``channels``,
  ``next_multiple``), ``untouchable`` (``floor_ms``: prediction with every prunable group at
  ``round_to``, with the closed loop's corrected end-to-end term; ``predicted_ms``: the compact
  model's; ``share`` = floor / predicted; ``floor_ratio`` and ``compact_ratio`` against the same
  prediction for the dense model; ``fixed_layers``; ``intercept_ms``),
  ``providers`` (ORT runtimes: ``nodes``, ``per_provider``, ``requested``, ``fallback_nodes``,
  ``session_providers``).
- ``training``: ``method``, ``target``, ``importance``, ``emerging`` (true: the knapsack was
  re-solved freely at every removal; false: floored at the plan validated before training),
  ``searched`` (true: the plan came from the plan search, and the removals floored at it),
  ``step_time_ratio``, ``predicted_ms``,
  ``prune_history`` (per removal: ``step``, ``iteration``, ``target``, ``predicted_ms``,
  ``predicted_ratio`` (of the table's dense latency), ``measured_ratio`` (compact / dense timed right
  after the removal on the deployment runtime; null when not measured),
  ``val_accuracy_after_removal`` (validation accuracy right after the removal, BatchNorm statistics
  re-estimated on ``schedule.recalibrate_batches`` training batches, before any further training;
  null when 0; added by issue 11), ``val_loss_after_removal`` (the mean validation cross-entropy
  of the same model; added by issue 12), ``value_minibatches`` (training minibatches the ``halp`` value
  averaged over for this removal; 0 when the criterion scored on its own batches or needs none),
  ``neurons``, ``params``), ``phases``, ``sharpness`` (loss increase under a worst-case L2 ball of
  radius ``rho``: ``pre_pruning`` after warm-up, ``post_pruning`` after the last removal),
  ``corrections`` (the budget checks after fine-tuning: ``check``, ``measured_ratio``,
  ``predicted_ratio``, ``wanted_ratio``, ``layers_ms``, ``params``, ``action`` ("accepted",
  "under budget", "removed" (then ``target_ms``, ``predicted_ms``, ``e2e``, ``widths``,
  ``params_after``, ``finetuned``), "over budget, ..."); empty for a parameter target),
  ``corrected_e2e`` (the end-to-end term after a corrective removal, else null), ``resumed``.
- ``robustness``: null with ``--robust-images 0``; else the compact model's ``clean_acc``,
  ``corruption_acc`` (mean of 75), ``R_C``, ``per_corruption``, ``eval_images``, ``suite``,
  ``informative`` (the corruptions on which the dense model's accuracy is above 1.5 x chance;
  added in schema 5) and ``informative_acc`` (the mean over them), and the same for ``dense``.
- ``int8``: null unless ``--precision int8``; else ``quantization`` (``method``, ``per_channel``,
  ``activations`` (uint8 or int8), ``symmetric_activations``, ``format``, ``weights``, ``calibration_images``,
  ``source``), ``dense`` / ``compact`` (the files ``dense.int8.onnx`` / ``model.int8.onnx`` as in
  ``onnx``, plus ``accuracy`` (test set, ONNX Runtime) and ``robustness`` (as ``robustness`` above,
  or null)), ``parity`` (model.int8.onnx against model.onnx: top-1 agreement only), ``latencies``
  (``dense_fp32``, ``dense_int8``, ``compact_fp32``, ``compact_int8``, timed side by side in the
  same sets of sessions: per-call ``median_ms``, ``p90_ms``, ``cv``, ``ratio`` to dense fp32 paired
  by round with ``ratio_ci95``, and ``ms`` = dense fp32 median x ratio). At int8 ``dense`` /
  ``compact`` ``latency_ms`` and the budget are int8 latencies (the deployed files); their
  ``accuracy`` stays the torch models'; the ``accuracy`` and ``corruption_accuracy`` gates judge
  the int8 compact file against the dense (fp32) model.
- ``runtime``: ``name``, ``backend``, ``version``, ``provider``, ``threads``, ``batch``,
  ``input_shape``, ``device``, ``dtype`` (at ``--precision int8`` the form: ``int8-u8s8`` on ``ort``,
  ``int8-s8s8`` for TensorRT).
- ``plan``: the knapsack's ``importance``, ``round_to``, ``table_target_ms``,
  ``table_predicted_ms``, ``table_layers_ms``, ``e2e``, ``unpruned``, ``knapsack_iterations``,
  ``value_cost`` (``sensitivity``: ``passes``, ``evaluated``, ``interpolated``, ``seconds``; else {}),
  ``calibration`` (closed-loop iterations; with the search, one row per search), ``calibrated_ratio``,
  ``plan_lines`` (``--plan-lines``: per round of grid lines measured through the plan's widths,
  ``lines``, ``measured``, ``from_store``, ``layers``; [] when none were missing),
  ``search`` (``pipeline.search``; {} when off: ``cost`` (``candidates``, ``eligible``, ``finalists``,
  ``timings``, ``iterations``, ``held_out_images``, ``seconds``) and ``candidates``, each with
  ``kind``, ``widths``, ``predicted_ms``, ``measured_ratios``, ``measured_ratio``, and where it was
  scored ``bn_accuracy``, ``bn_loss``, ``finetuned_accuracy``, ``finetuned_loss``, ``chosen``).
- ``table``: ``entries``, ``dense_ms_at_profile``, ``e2e``, ``validation``, ``unmeasured``.
- ``stage_seconds``, ``environment`` (versions, CPU, threads), ``artifacts`` (files in the run dir).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from latprune.io import write_bytes_atomic, write_json_atomic
from latprune.latency_tables.device import environment
from latprune.latency_tables.endtoend import SpeedResult
from latprune.latency_tables.plots import pyplot, save_png
from latprune.latency_tables.table import LatencyTable
from latprune.models.graph import output_channels
from latprune.pipeline.calibrate import CalibratedPlan
from latprune.pipeline.gates import budget_verdict, check_gates
from latprune.pipeline.robustness import ABOVE_CHANCE
from latprune.pipeline.stages import CompactModel, DenseModel, Diagnosis, Evaluation, ExportResult, Inputs, RunDir

__all__ = ["SCHEMA_VERSION", "build_report", "write_report", "render_markdown"]

SCHEMA_VERSION = 6  # 2: gates, onnx, tensorrt, layer_latency, why_not_faster; parity per output. 3: emerging
# schedule, per-removal measured latency, corrective checks. 4: the plan search. 5: informative corruptions.
# 6: int8 (files, parity, accuracies, the four latencies side by side)
ROBUSTNESS_SUITE = "CIFAR-10-C-style (imagecorruptions-imaug: 15 corruptions x 5 severities)"


def build_report(inp: Inputs, rd: RunDir, dense: DenseModel, compact: CompactModel, table: LatencyTable,
                 cal: CalibratedPlan, ex: ExportResult, speed: SpeedResult, ev: Evaluation,
                 diag: Diagnosis, side_by_side: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """report.json (without ``schema_version``) from the stages' artifacts; ``table`` is the
    profiled table, ``cal.table`` the one the closed loop corrected; ``side_by_side`` the int8
    run's four latencies (``stages.precision_stage``). Measures nothing."""
    cfg, fp = inp.cfg, inp.backend.fingerprint(inp.input_shape)
    dense_ms, compact_ms = speed.dense["median_ms"], speed.compact_ms
    ft = compact.training
    robustness = None
    if ev.robustness is not None:
        robustness = {**dataclasses.asdict(ev.robustness), "dense": dataclasses.asdict(ev.dense_robustness),
                      "suite": ROBUSTNESS_SUITE}
    report = {
        "model": inp.spec.name, "data": inp.data.name,
        "budget": budget_verdict(cfg, dense_ms, compact_ms, ev.dense_params, ev.compact_params),
        "dense": {"latency_ms": dense_ms, "latency_p90_ms": speed.dense["p90_ms"], "cv": speed.dense["cv"],
                  "predicted_ms": table.dense_ms, "accuracy": ev.dense_accuracy, "params": ev.dense_params,
                  "macs": ev.dense_macs, "channels": output_channels(dense.model), "pretrain": dense.info},
        "compact": {"latency_ms": compact_ms, "latency_pooled_median_ms": speed.compact["median_ms"],
                    "latency_p90_ms": speed.compact["p90_ms"], "cv": speed.compact["cv"],
                    "predicted_ms": ft["predicted_ms"] * dense_ms / table.dense_ms,
                    "predicted_ratio": ft["predicted_ms"] / table.dense_ms,
                    "accuracy": ev.compact_accuracy, "params": ev.compact_params, "macs": ev.compact_macs,
                    "channels": output_channels(compact.model)},
        "training": ft,
        "robustness": robustness,
        "speedup": speed.speedup, "speedup_ci95": list(speed.speedup_ci95),
        "parity": ex.parity.to_dict(),
        "onnx": {"dense": ex.dense.to_dict(), "compact": ex.compact.to_dict(), "shrink": ex.shrink,
                 "contract": ex.contract},
        "tensorrt": ex.tensorrt,
        "int8": None if ex.int8 is None else {**ex.int8.to_dict(), "latencies": side_by_side,
                                               "dense": {**ex.int8.dense.to_dict(), **ev.int8["dense"]},
                                               "compact": {**ex.int8.compact.to_dict(), **ev.int8["compact"]}},
        "layer_latency": diag.layers,
        "why_not_faster": diag.why_not_faster,
        "runtime": {"name": type(inp.backend).library, "backend": fp.runtime,
                    "version": fp.runtime_version, "provider": fp.provider, "threads": fp.threads, "batch": fp.batch,
                    "input_shape": [fp.batch, *fp.input_shape], "device": fp.device, "dtype": fp.dtype},
        "plan": {"importance": cal.plan.importance, "round_to": cal.plan.round_to,
                 "table_target_ms": cal.plan.target_ms, "table_predicted_ms": cal.plan.predicted_ms,
                 "table_layers_ms": cal.plan.layers_ms, "e2e": cal.plan.e2e, "unpruned": cal.plan.unpruned,
                 "knapsack_iterations": cal.plan.iterations, "value_cost": cal.plan.value_cost,
                 "calibration": cal.history, "calibrated_ratio": cal.measured_ratio, "search": cal.plan.search,
                 "plan_lines": cal.table.meta.get("plan_lines", [])},
        "table": {"entries": table.entries, "dense_ms_at_profile": table.dense_ms,
                  "e2e": {"intercept_ms": table.e2e.intercept_ms, "slope": table.e2e.slope,
                          "points": len(table.e2e.points)},
                  "validation": _validation_summary(table), "unmeasured": table.unmeasured},
        "verify": {"pair_ratios": speed.repeats, "timing": dataclasses.asdict(cfg.verify)},
        "seed": cfg.seed, "stage_seconds": dict(rd.seconds), "environment": environment(),
        "artifacts": sorted(p.name for p in rd.path.iterdir() if not p.name.startswith(".")),
    }
    report["gates"] = check_gates(cfg.gates, report)
    return report


def _validation_summary(table: LatencyTable) -> dict[str, Any] | None:
    v = table.validation
    return None if v is None else {k: v[k] for k in ("k", "median_rel_err", "p90_rel_err", "max_rel_err")}


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    report = {"schema_version": SCHEMA_VERSION, **report}
    plot_channels(report, run_dir / "channels.png")
    if (report.get("int8") or {}).get("latencies"):
        plot_precision_latency(report, run_dir / "precision_latency.png")
    if report.get("layer_latency"):
        plot_layer_latency(report, run_dir / "layer_latency.png")
    write_bytes_atomic(run_dir / "report.md", render_markdown(report).encode())
    return write_json_atomic(run_dir / "report.json", report)


def plot_channels(r: dict[str, Any], path: Path) -> Path:
    """Bar chart of output channels per layer, dense against compact, with the headline figures."""
    plt = pyplot()

    names = list(r["dense"]["channels"])
    dense = [r["dense"]["channels"][n] for n in names]
    compact = [r["compact"]["channels"].get(n, 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.2))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], dense, 0.4, label="dense", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], compact, 0.4, label="compact (latprune)", color="#1f77b4")
    ax.set_xticks(list(x), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(
        f"{r['model']}: {r['dense']['latency_ms']:.2f} -> {r['compact']['latency_ms']:.2f} ms/batch of "
        f"{r['runtime']['batch']} ({r['runtime']['name']}), {_budget_short(r['budget'])}; "
        f"accuracy {r['dense']['accuracy']:.3f} -> {r['compact']['accuracy']:.3f}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


PRECISION_LABELS = {"dense_fp32": "dense fp32", "dense_int8": "dense int8", "compact_fp32": "compact fp32",
                    "compact_int8": "compact int8"}


def plot_precision_latency(r: dict[str, Any], path: Path) -> Path:
    """The int8 run's four latencies (timed side by side), with the budget and each model's accuracy."""
    plt = pyplot()

    q, lat = r["int8"], r["int8"]["latencies"]
    acc = {"dense_fp32": r["dense"]["accuracy"], "dense_int8": q["dense"]["accuracy"],
           "compact_fp32": r["compact"]["accuracy"], "compact_int8": q["compact"]["accuracy"]}
    names = [k for k in PRECISION_LABELS if k in lat]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"dense_fp32": "#9aa5b1", "dense_int8": "#c9d1d9", "compact_fp32": "#9ecae1", "compact_int8": "#1f77b4"}
    bars = ax.bar([PRECISION_LABELS[k] for k in names], [lat[k]["ms"] for k in names],
                  yerr=[[max(lat[k]["ms"] - lat[k]["ratio_ci95"][0] * lat["dense_fp32"]["ms"], 0.0) for k in names],
                        [max(lat[k]["ratio_ci95"][1] * lat["dense_fp32"]["ms"] - lat[k]["ms"], 0.0) for k in names]],
                  color=[colors[k] for k in names], capsize=3)
    for bar, k in zip(bars, names):
        ax.annotate(f"acc {acc[k]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
    b = r["budget"]
    if b.get("target_ms") is not None:
        ax.axhline(b["target_ms"] * lat["dense_int8"]["ms"] / r["dense"]["latency_ms"], color="#d62728", ls="--",
                   lw=1, label="budget (of dense int8)")
        ax.legend(fontsize=7)
    ax.set_ylabel(f"ms per batch of {r['runtime']['batch']} (side by side, paired to dense fp32)")
    ax.set_title(f"{r['model']} on {r['runtime']['name']}: fp32 and int8, dense and compact", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_layer_latency(r: dict[str, Any], path: Path) -> Path:
    """Per layer: the table's prediction at the dense widths, at the compact widths, and the compact
    layer measured alone at its widths now."""
    plt = pyplot()

    rows = r["layer_latency"]
    names = [f"{x['layer']}\n{x['dense_c_in']}x{x['dense_c_out']}->{x['c_in']}x{x['c_out']}" for x in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(rows) + 2), 4.6))
    x = range(len(rows))
    ax.bar([i - 0.27 for i in x], [v["dense_predicted_ms"] for v in rows], 0.27, label="dense widths, table",
           color="#c9d1d9")
    ax.bar(list(x), [v["predicted_ms"] for v in rows], 0.27, label="compact widths, table (predicted)", color="#9ecae1")
    ax.bar([i + 0.27 for i in x], [v["measured_ms"] for v in rows], 0.27, label="compact widths, measured now",
           color="#1f77b4")
    ax.set_xticks(list(x), names, rotation=75, ha="right", fontsize=6)
    ax.set_ylabel(f"ms per batch of {r['runtime']['batch']} (layer alone)")
    ax.set_xlabel("layer and its widths (c_in x c_out): dense -> compact", fontsize=8)
    pred = sum(v["predicted_ms"] for v in rows)
    meas = sum(v["measured_ms"] for v in rows)
    ax.set_title(f"Per-layer latency on {r['runtime']['name']} ({r['runtime']['threads']} threads): "
                 "compact layers sum to "
                 f"{meas:.2f} ms measured vs {pred:.2f} ms predicted", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def _budget_short(b: dict[str, Any]) -> str:
    verdict = "met" if b["met"] else "MISSED"
    if b.get("target") == "params":
        return f"parameter ratio {b['achieved_param_ratio']:.3f} for {b['param_ratio']:.3f} {verdict}"
    return f"budget {b['target_ms']:.2f} ms {verdict}"


def _fmt(v, nd=3):
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _target(h: dict[str, Any]) -> str:
    t = h.get("target") or {"latency_ms": h["target_ms"]}
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in t.items())


def _sharpness_line(s: dict[str, Any]) -> str:
    if "pre_pruning" not in s:
        return ""
    return (f"Sharpness (max loss increase in an L2 ball of radius {s['rho']}, {s['steps']} ascent steps, "
            f"{s['images']} training images): {s['pre_pruning']:.4f} before pruning, "
            f"{s['post_pruning']:.4f} after the last removal (before fine-tuning).")


def _table_section(r: dict[str, Any]) -> list[str]:
    t = r.get("table") or {}
    e = t.get("e2e") or {}
    lines = ["## Latency table", "",
             f"{t.get('entries')} measured entries; whole-model prediction = {_fmt(e.get('intercept_ms'))} ms + "
             f"{_fmt(e.get('slope'))} x (sum of the layer tables), fitted on {e.get('points')} "
             "configurations timed end "
             "to end. Staircases: ![staircases](table_staircases.png)"]
    v = t.get("validation")
    if v:
        lines += ["", f"Validated on {v['k']} random pruned configurations: "
                  f"median error {100 * v['median_rel_err']:.1f} %, "
                  f"p90 {100 * v['p90_rel_err']:.1f} %, max {100 * v['max_rel_err']:.1f} %. "
                  "![predicted vs measured](table_validation.png)"]
    else:
        lines += ["", "Not validated in this run (`latprune profile --validate K` measures the prediction error)."]
    for name, why in (t.get("unmeasured") or {}).items():
        lines.append(f"- layer `{name}` was not profiled: {why}")
    for name, why in (r.get("plan", {}).get("unpruned") or {}).items():
        lines.append(f"- group `{name}` stays unpruned: {why}")
    return lines


def _search_section(search: dict[str, Any]) -> list[str]:
    if not search:
        return []
    c = search["cost"]
    scored = [r for r in search["candidates"] if "bn_accuracy" in r]
    out = ["## Plan search", "",
           f"{c['candidates']} candidate plans, {c['timings']} timings against the dense model; {c['eligible']} "
           f"measured under the budget were scored on {c['held_out_images']} held-out images (BatchNorm "
           f"re-estimated), {c['finalists']} of them after {c['iterations']} fine-tuning iterations; "
           f"{c['seconds']:.0f} s.", "",
           "| candidate | measured / dense (median) | accuracy, BN re-estimated | after the short fine-tune | |",
           "|---|---:|---:|---:|---|"]
    out += [f"| {r['kind']} | {_fmt(r.get('measured_ratio'))} | {r['bn_accuracy']:.4f} | "
            f"{_fmt(r.get('finetuned_accuracy'), 4)} | {'chosen' if r.get('chosen') else ''} |" for r in scored]
    return [*out, ""]


def _corrections_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["Budget checks after fine-tuning (compact / dense measured; over the window, the end-to-end term is "
           "corrected through the measurement, the knapsack re-solved on the model and a short fine-tune run):", "",
           "| check | measured | predicted | wanted | action |", "|---:|---:|---:|---:|---|"]
    out += [f"| {c['check']} | {c['measured_ratio']:.3f} | {c['predicted_ratio']:.3f} | {c['wanted_ratio']:.3f} | "
            f"{c['action']}{_removed(c)} |" for c in rows]
    return [*out, ""]


def _removed(c: dict[str, Any]) -> str:
    if c.get("action") != "removed":
        return ""
    return f" to {c['params_after']:,} params (predicted {c['predicted_ms']:.3f} ms)"


def _gates_section(r: dict[str, Any]) -> list[str]:
    gates = r.get("gates") or []
    failed = [g["name"] for g in gates if not g["ok"]]
    lines = ["## Deployment gates: " + (f"**FAILED: {', '.join(failed)}**" if failed else "all passed"), "",
             "| gate | verdict | detail |", "|---|---|---|"]
    lines += [f"| {g['name']} | {'pass' if g['ok'] else '**FAIL**'} | {g['detail']} |" for g in gates]
    return lines


def _export_section(r: dict[str, Any]) -> list[str]:
    o = r.get("onnx")
    if not o:
        return []
    d, c, p = o["dense"], o["compact"], r["parity"]
    lines = ["## Exported files", "",
             "| file | opset | input | size (bytes) | sha256 |", "|---|---:|---|---:|---|",
             *[f"| {a['file']} | {a['opset']} | {a['input_shape']} | {a['size_bytes']:,} | `{a['sha256'][:16]}` |"
               for a in (d, c)],
             "",
             f"Parity (ONNX Runtime CPU against torch, {p['images']} test images in {p['batches']} batches; an element "
             f"passes when |diff| <= {p['atol']:g} + {p['rtol']:g} x |torch|, "
             f"top-1 must agree on {p['min_top1']:.0%}):",
             "", "| output | max abs diff | max rel diff | top-1 agreement | verdict |", "|---|---:|---:|---:|---|"]
    for x in p["outputs"]:
        t1 = "n/a" if x["top1_agreement"] is None else f"{x['top1_agreement']:.4f}"
        lines.append(f"| {x['name']} | {x['max_abs_diff']:.2e} | {x['max_rel_diff']:.2e} | {t1} | "
                     f"{'pass' if x['ok'] else '**diverged**'} |")
    k = o["contract"]
    lines += ["", "Preprocessing contract (also in each file's ONNX metadata, key `latprune.preprocessing`): input "
              f"{k.get('layout')}, shape {k.get('input_shape')}, channels {k.get('channel_order')}, resize "
              f"{k.get('resize')}, mean {k.get('mean')}, std {k.get('std')}, classes {k.get('classes')}."]
    t = r.get("tensorrt")
    if t:
        lines += ["", f"### TensorRT ({t['note']})", "",
                  "| engine | size (bytes) | build (s) | GPU compute p50 (ms) | end to end with copies p50 (ms) |",
                  "|---|---:|---:|---:|---:|"]
        for k2, e in t["engines"].items():
            lat = t["latency"][k2]
            lines.append(f"| {e['file']} | {e['size_bytes']:,} | {e['build_s']:.1f} | "
                         f"{lat['gpu_compute']['median_ms']:.3f} | "
                         f"{lat['end_to_end']['median_ms']:.3f} |")
        lines += ["", f"Engine parity: {t['parity']['detail']}."]
    return lines


def _int8_section(r: dict[str, Any]) -> list[str]:
    q = r.get("int8")
    if not q:
        return []
    k, lat, p = q["quantization"], q.get("latencies") or {}, q["parity"]
    lines = ["## Int8", "",
             f"Both files quantized by ONNX Runtime's static quantization ({k['format']}, int8 weights "
             f"{'per channel' if k['per_channel'] else 'per tensor'}, {k['activations']} activations "
             f"{'symmetric (zero point 0)' if k['symmetric_activations'] else 'asymmetric'}), {k['method']} "
             f"calibration on {k['source']}. The budget is a fraction of the dense model's int8 latency.", "",
             "| | latency (ms, side by side) | / dense fp32 (95% interval) | test accuracy | corruption accuracy |",
             "|---|---:|---:|---:|---:|"]
    acc = {"dense_fp32": (r["dense"]["accuracy"], (r.get("robustness") or {}).get("dense", {}).get("corruption_acc")),
           "dense_int8": (q["dense"]["accuracy"], (q["dense"].get("robustness") or {}).get("corruption_acc")),
           "compact_fp32": (r["compact"]["accuracy"], (r.get("robustness") or {}).get("corruption_acc")),
           "compact_int8": (q["compact"]["accuracy"], (q["compact"].get("robustness") or {}).get("corruption_acc"))}
    for name, label in PRECISION_LABELS.items():
        t = lat.get(name)
        timing = (f"{t['ms']:.3f} | {t['ratio']:.3f} ({t['ratio_ci95'][0]:.3f}-{t['ratio_ci95'][1]:.3f})" if t
                  else "n/a | n/a")
        lines.append(f"| {label} | {timing} | {acc[name][0]:.4f} | {_fmt(acc[name][1], 4)} |")
    lines += ["", f"Int8 parity: {p['detail']}. ![fp32 and int8 latencies](precision_latency.png)"]
    return lines


def _why_section(r: dict[str, Any]) -> list[str]:
    w = r.get("why_not_faster")
    if not w:
        return []
    u = w["untouchable"]
    lines = ["## Why is it not faster?", "",
             f"- **Time pruning cannot touch**: with every prunable group cut to {u['round_to']} channels the table "
             f"predicts {u['floor_ratio']:.2f} of the dense latency, against {u['compact_ratio']:.2f} for the compact "
             f"model: {100 * u['share']:.0f} % of the compact model's time is out of pruning's reach (per-call "
             "overhead, stem, pooling, adds, the classifier"
             + (f"; layers no prunable group reaches: {', '.join(u['fixed_layers'])}" if u["fixed_layers"] else "")
             + "). Only the other "
             f"{100 * (1 - u['share']):.0f} % can still be pruned away on this runtime."]
    og, k = w["off_grid"], w["hardware_multiple"]
    if og:
        lines.append(f"- **Widths off the hardware grid** (multiples of {k} on this device): "
                     + ", ".join(f"`{x['layer']}` {x['channels']} (next {x['next_multiple']})" for x in og[:12])
                     + (f" and {len(og) - 12} more" if len(og) > 12 else "")
                     + f"; `--round-to {k}` keeps widths on it.")
    else:
        lines.append(f"- **Widths**: every pruned width is a multiple of {k}, the width this device vectorises over.")
    p = w.get("providers")
    if p:
        per = ", ".join(f"{n} on {prov}" for prov, n in p["per_provider"].items())
        lines.append(f"- **Provider placement** (ORT profile of one run of model.onnx): {p['nodes']} nodes, {per}; "
                     + ("no fallback." if not p["fallback_nodes"] else f"**{p['fallback_nodes']} node(s) fell back** "
                        f"from {p['requested']}."))
    lat = r.get("layer_latency") or []
    if lat:
        worst = max(lat, key=lambda x: abs(x["measured_ms"] - x["predicted_ms"]) / max(x["predicted_ms"], 1e-9))
        err = (worst["measured_ms"] - worst["predicted_ms"]) / max(worst["predicted_ms"], 1e-9)
        lines.append(f"- **Table against the compact layers** (each timed alone at its widths, "
                     f"![per-layer latency](layer_latency.png)): largest miss `{worst['layer']}` at "
                     f"{worst['c_in']}x{worst['c_out']}, measured {worst['measured_ms']:.3f} ms vs predicted "
                     f"{worst['predicted_ms']:.3f} ms ({100 * err:+.0f} %).")
    return lines


def render_markdown(r: dict[str, Any]) -> str:
    b, d, c, rt = r["budget"], r["dense"], r["compact"], r["runtime"]
    verdict = "**met**" if b["met"] else "**MISSED**"
    if b.get("target") == "params":
        head = (f"Parameter target {verdict}: the compact model keeps {b['achieved_param_ratio']:.3f} of the dense "
                f"parameters for a requested {b['param_ratio']:.3f} (AdaSAP_P, no latency budget); latency measured")
    else:
        head = (f"Budget {verdict}: compact {c['latency_ms']:.3f} ms against a target of {b['target_ms']:.3f} ms "
                f"({_fmt(b.get('fraction'), 2)} of dense)")
    lines = [
        f"# latprune report: {r['model']} on {r['data']}",
        "",
        f"{head} on {rt['name']} {rt['version']} ({rt['provider']}), "
        f"batch {rt['batch']}, {rt['threads']} threads, {rt['device']}.",
        "",
        "| | dense | compact |",
        "|---|---:|---:|",
        f"| latency (ms / batch, median; compact: paired by round) | {d['latency_ms']:.3f} | {c['latency_ms']:.3f} |",
        f"| latency p90 (ms) | {d['latency_p90_ms']:.3f} | {c['latency_p90_ms']:.3f} |",
        f"| predicted by the table (ms) | {_fmt(d.get('predicted_ms'))} | {_fmt(c.get('predicted_ms'))} |",
        f"| test accuracy | {d['accuracy']:.4f} | {c['accuracy']:.4f} |",
        f"| parameters | {d['params']:,} | {c['params']:,} |",
        f"| MACs (per image) | {d['macs']:,} | {c['macs']:,} |",
        "",
        f"Speedup {r['speedup']:.2f}x, paired by interleaved round (95% bootstrap interval over rounds "
        f"{r['speedup_ci95'][0]:.2f}-"
        f"{r['speedup_ci95'][1]:.2f}); MACs reduced {d['macs'] / max(c['macs'], 1):.2f}x.",
        "",
        *_gates_section(r),
        "",
        f"Training: {r['training']['method']} (one step costs {r['training']['step_time_ratio']:.2f}x an SGD step); "
        f"{len(r['training']['prune_history'])} removals, each "
        + ("ranking neurons globally by importance." if b.get("target") == "params"
           else "re-solving the knapsack on the pruned model."),
        _sharpness_line(r["training"].get("sharpness") or {}),
        "",
        "| removal | iteration | target | predicted ms | predicted / measured of dense | neurons | params | "
        "val accuracy right after * |",
        "|---:|---:|---|---:|---|---:|---:|---:|",
        *[f"| {h['step']} | {h['iteration']} | {_target(h)} | {h['predicted_ms']:.3f} | "
          f"{_fmt(h.get('predicted_ratio'))} / {_fmt(h.get('measured_ratio'))} | {h.get('neurons', '?')} | "
          f"{h['params']:,} | {_fmt(h.get('val_accuracy_after_removal'), 4)} |"
          for h in r["training"]["prune_history"]],
        "",
        "\\* right after the removal, before any further training, BatchNorm statistics re-estimated on "
        "training batches.",
        "",
        *_corrections_section(r["training"].get("corrections") or []),
        "![channels per layer](channels.png)",
        "",
        "## Budget calibration (planned widths timed before training)",
        "",
        "Ratios to the dense model. Each row: the knapsack solved with the end-to-end term shown, the plan",
        "was pruned from a copy and timed against the dense model; off the window, the term is corrected",
        "through the measured point and the knapsack re-solved.",
        "",
    ]
    pl = r["plan"].get("plan_lines") or []
    if pl:
        lines += [f"Before it, {sum(d['lines'] for d in pl)} grid lines of the table were measured through the "
                  f"knapsack's widths in {len(pl)} round(s) ({sum(d['measured'] for d in pl)} entries timed, "
                  f"{sum(d['from_store'] for d in pl)} from the latency store; `--plan-lines`), before the first "
                  "plan below was timed.", ""]
    lines += [
        "| iteration | target | predicted | measured (pairs of sessions) | end-to-end term |",
        "|---:|---:|---:|---|---|",
    ]
    for h in r["plan"]["calibration"]:
        pairs = ", ".join(f"{x:.3f}" for x in h.get("pair_ratios", []))
        again = f" (plan of iteration {h['repeat_of']} again)" if "repeat_of" in h else ""
        lines.append(f"| {h['iteration']} | {h['target_ratio']:.3f} | {h['predicted_ratio']:.3f} | "
                     f"{h['measured_ratio']:.3f} ({pairs}){again} | {h['e2e']['intercept_ms']:.3f} ms + "
                     f"{h['e2e']['slope']:.3f} x tables |")
    if r["plan"]["calibrated_ratio"] is not None:
        final_pairs = ", ".join(f"{x:.3f}" for x in r.get("verify", {}).get("pair_ratios", []))
        lines += ["", f"The chosen widths measured {r['plan']['calibrated_ratio']:.3f} of dense before training and "
                  f"{c['latency_ms'] / d['latency_ms']:.3f} now (pairs of sessions: {final_pairs}); weights do not "
                  "change latency, so a difference is timing drift on this machine."]
    else:
        lines += ["", "No calibration: a parameter target does not constrain latency."]
    lines += ["", *_search_section(r["plan"].get("search") or {}), *_table_section(r), "", *_export_section(r), "",
              *_int8_section(r), "", *_why_section(r)]
    rob = r.get("robustness")
    if rob:
        lines += ["", f"## Robustness: {rob['suite']}, first {rob['eval_images']} test images", "",
                  "| | dense | compact |", "|---|---:|---:|",
                  f"| clean accuracy | {rob['dense']['clean_acc']:.4f} | {rob['clean_acc']:.4f} |",
                  f"| corruption accuracy (mean of 75) | {rob['dense']['corruption_acc']:.4f} | "
                  f"{rob['corruption_acc']:.4f} |",
                  f"| corruption accuracy, the {len(rob['informative'])} informative (dense > {ABOVE_CHANCE:g} x "
                  f"chance) | {rob['dense']['informative_acc']:.4f} | {rob['informative_acc']:.4f} |",
                  f"| R_C = corruption / clean | {rob['dense']['R_C']:.3f} | {rob['R_C']:.3f} |"]
        lines += [f"| {name} | {rob['dense']['per_corruption'][name]:.4f} | {acc:.4f} |"
                  for name, acc in rob["per_corruption"].items()]
    lines += ["", "## Channels per layer (output channels)", "", "| layer | dense | compact |", "|---|---:|---:|"]
    for name, k in c["channels"].items():
        lines.append(f"| {name} | {d['channels'].get(name, '?')} | {k} |")
    lines += ["", "## Stage times (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in r["stage_seconds"].items()]
    lines += ["", f"Seed {r['seed']}. Environment: "
              + ", ".join(f"{k} {v}" for k, v in r["environment"].items() if v), ""]
    return "\n".join(lines)
