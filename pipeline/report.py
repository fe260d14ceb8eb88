"""Stage 5: the run's report, ``report.json`` (schema below) and ``report.md``.

report.json, schema_version 1. Latencies are milliseconds per batch of ``runtime.batch`` images,
medians of dense and compact timed interleaved in one process; accuracies are fractions in [0, 1];
``speedup = dense.latency_ms / compact.latency_ms``. With ``budget.target == "latency"``,
``budget.met`` is ``compact.latency_ms <= budget.target_ms``; with ``"params"`` (AdaSAP_P),
``budget.param_ratio`` is the requested kept-parameter ratio, ``budget.achieved_param_ratio`` the
result, ``budget.met`` whether it is at most the request, and ``target_ms`` is null.
``training.sharpness`` holds the loss increase under a worst-case L2 ball of radius ``rho``
(``pre_pruning``: after warm-up; ``post_pruning``: after the last removal, before fine-tuning).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from latprune.latency_tables.table import write_bytes_atomic, write_json_atomic

SCHEMA_VERSION = 1


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    report = {"schema_version": SCHEMA_VERSION, **report}
    plot_channels(report, run_dir / "channels.png")
    write_bytes_atomic(run_dir / "report.md", render_markdown(report).encode())
    return write_json_atomic(run_dir / "report.json", report)


def plot_channels(r: dict[str, Any], path: Path) -> Path:
    """Bar chart of output channels per layer, dense against compact, with the headline figures."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        f"{r['runtime']['batch']} ({r['runtime']['name']}), {_budget_short(r['budget'])}; accuracy {r['dense']['accuracy']:.3f} -> {r['compact']['accuracy']:.3f}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


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
             f"{_fmt(e.get('slope'))} x (sum of the layer tables), fitted on {e.get('points')} configurations timed end "
             "to end. Staircases: ![staircases](table_staircases.png)"]
    v = t.get("validation")
    if v:
        lines += ["", f"Validated on {v['k']} random pruned configurations: median error {100 * v['median_rel_err']:.1f} %, "
                  f"p90 {100 * v['p90_rel_err']:.1f} %, max {100 * v['max_rel_err']:.1f} %. "
                  "![predicted vs measured](table_validation.png)"]
    else:
        lines += ["", "Not validated in this run (`latprune profile --validate K` measures the prediction error)."]
    for name, why in (t.get("unmeasured") or {}).items():
        lines.append(f"- layer `{name}` was not profiled: {why}")
    for name, why in (r.get("plan", {}).get("unpruned") or {}).items():
        lines.append(f"- group `{name}` stays unpruned: {why}")
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
        f"| latency (ms / batch, median) | {d['latency_ms']:.3f} | {c['latency_ms']:.3f} |",
        f"| latency p90 (ms) | {d['latency_p90_ms']:.3f} | {c['latency_p90_ms']:.3f} |",
        f"| predicted by the table (ms) | {_fmt(d.get('predicted_ms'))} | {_fmt(c.get('predicted_ms'))} |",
        f"| test accuracy | {d['accuracy']:.4f} | {c['accuracy']:.4f} |",
        f"| parameters | {d['params']:,} | {c['params']:,} |",
        f"| MACs (per image) | {d['macs']:,} | {c['macs']:,} |",
        "",
        f"Speedup {r['speedup']:.2f}x (95% bootstrap interval over rounds {r['speedup_ci95'][0]:.2f}-"
        f"{r['speedup_ci95'][1]:.2f}); MACs reduced {d['macs'] / max(c['macs'], 1):.2f}x.",
        f"ONNX parity: max abs diff {r['parity']['max_abs_diff']:.2e}, top-1 agreement "
        f"{r['parity']['top1_agreement']:.3f} on {r['parity']['batch']} test images.",
        "",
        f"Training: {r['training']['method']} (one step costs {r['training']['step_time_ratio']:.2f}x an SGD step); "
        f"{len(r['training']['prune_history'])} removals, each "
        + ("ranking neurons globally by importance." if b.get("target") == "params"
           else "re-solving the knapsack on the pruned model."),
        _sharpness_line(r["training"].get("sharpness") or {}),
        "",
        "| removal | iteration | target | predicted ms | neurons | params |",
        "|---:|---:|---|---:|---:|---:|",
        *[f"| {h['step']} | {h['iteration']} | {_target(h)} | {h['predicted_ms']:.3f} | {h.get('neurons', '?')} | "
          f"{h['params']:,} |" for h in r["training"]["prune_history"]],
        "",
        "![channels per layer](channels.png)",
        "",
        "## Budget calibration (planned widths timed before training)",
        "",
        "Ratios to the dense model. Each row: the knapsack solved with the end-to-end term shown, the plan",
        "was pruned from a copy and timed against the dense model; off the window, the term is corrected",
        "through the measured point and the knapsack re-solved.",
        "",
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
    lines += ["", *_table_section(r)]
    rob = r.get("robustness")
    if rob:
        lines += ["", f"## Robustness: {rob['suite']}, first {rob['eval_images']} test images", "",
                  "| | dense | compact |", "|---|---:|---:|",
                  f"| clean accuracy | {rob['dense']['clean_acc']:.4f} | {rob['clean_acc']:.4f} |",
                  f"| corruption accuracy (mean of 75) | {rob['dense']['corruption_acc']:.4f} | {rob['corruption_acc']:.4f} |",
                  f"| R_C = corruption / clean | {rob['dense']['R_C']:.3f} | {rob['R_C']:.3f} |"]
        lines += [f"| {name} | {rob['dense']['per_corruption'][name]:.4f} | {acc:.4f} |"
                  for name, acc in rob["per_corruption"].items()]
    lines += ["", "## Channels per layer (output channels)", "", "| layer | dense | compact |", "|---|---:|---:|"]
    for name, k in c["channels"].items():
        lines.append(f"| {name} | {d['channels'].get(name, '?')} | {k} |")
    lines += ["", "## Stage times (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in r["stage_seconds"].items()]
    lines += ["", f"Seed {r['seed']}. Environment: " + ", ".join(f"{k} {v}" for k, v in r["environment"].items() if v), ""]
    return "\n".join(lines)
