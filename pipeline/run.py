"""The pipeline, end to end: model -> latency table -> knapsack plan -> prune and fine-tune ->
compact model -> export -> verify -> report.

Each stage writes its artifact into the run directory atomically, with a key of its inputs in
``stages.json``; running again with the same ``--out`` resumes, reusing every artifact whose
inputs did not change. A run that fails on bad input removes the directory it created.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from latprune.errors import GATE_EXIT, BadInput
from latprune.export.onnx_export import OnnxArtifact, check_shrink, contract_metadata, export_onnx
from latprune.export.verify import Parity, SpeedResult, check_parity, measure_speedup
from latprune.latency_tables.backends import Backend, get_backend
from latprune.latency_tables.device import environment, latprune_version
from latprune.latency_tables.profile import check_layers, layer_signatures, profile_model
from latprune.latency_tables.endtoend import validate_table
from latprune.latency_tables.plots import plot_staircases, plot_validation
from latprune.latency_tables.table import SCHEMA_VERSION, EndToEnd, LatencyTable, write_json_atomic
from latprune.pipeline import distributed
from latprune.pipeline.calibrate import CalibratedPlan, plan_to_budget
from latprune.pipeline.compact import load_compact, save_compact
from latprune.pipeline.config import RunConfig
from latprune.pipeline.data import Dataset, load_dataset
from latprune.pipeline.diagnose import diagnose
from latprune.pipeline.models import ModelSpec
from latprune.pipeline.plan import PruningPlan, build_param_plan, count_params
from latprune.pipeline.schedule import step_time_ratio, train_and_prune_
from latprune.pipeline.report import write_report
from latprune.pipeline.robustness import corrupted_test_set, evaluate_robustness
from latprune.pipeline.train import cache_key, evaluate, pretrained, save_atomic

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Workspace:
    """What every stage needs: the validated config, data, model spec, backend and run directory."""

    cfg: RunConfig
    data: Dataset
    spec: ModelSpec
    backend: Backend
    run_dir: Path
    created: bool = False
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.data.input_shape

    @property
    def cache(self) -> Path:
        return Path(self.cfg.cache_dir).expanduser()

    def stage_key(self, stage: str, **inputs: Any) -> tuple[str, bool]:
        """The key of a stage's inputs, and whether the run dir holds an artifact made from them."""
        key = cache_key(**inputs)
        keys = self._keys()
        return key, keys.get(stage) == key

    def done(self, stage: str, key: str) -> None:
        keys = self._keys()
        keys[stage] = key
        write_json_atomic(self.run_dir / "stages.json", keys)

    def _keys(self) -> dict[str, str]:
        p = self.run_dir / "stages.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @contextlib.contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def removed_on_bad_input(self):
        try:
            yield
        except BadInput:
            if self.created:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise


def prepare(cfg: RunConfig) -> Workspace:
    """Validate everything that can be validated before writing a single file."""
    data = load_dataset(cfg.data, seed=cfg.seed, cache_dir=Path(cfg.cache_dir).expanduser())
    spec = ModelSpec(cfg.model, data.num_classes)
    spec.build()  # unknown names and broken factories fail here
    backend = get_backend(cfg.deploy.runtime, cfg.deploy.threads, cfg.deploy.batch, cfg.deploy.fp16)
    if cfg.weights and not Path(cfg.weights).exists():
        raise BadInput(f"--weights {cfg.weights} does not exist: pass a state_dict saved with torch.save")
    if cfg.table:
        LatencyTable.load(cfg.table).check_compatible(backend.fingerprint(data.input_shape), cfg.force)
    if cfg.gates.max_corruption_drop is not None and not cfg.robustness.images:
        raise BadInput("a corruption-accuracy gate needs the corruption evaluation: set --robust-images > 0 "
                       "(or drop --max-corruption-drop)")
    out = Path(distributed.broadcast(cfg.out or f"runs/{cfg.model.replace(':', '_').replace('/', '_')}-"
                                                 f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"))
    created = distributed.broadcast(not out.exists())
    distributed.barrier()  # every rank has looked before rank 0 creates it
    cfg = dataclasses.replace(cfg, out=str(out))
    ws = Workspace(cfg, data, spec, backend, out, created and distributed.is_main())
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", cfg.to_dict())
        write_json_atomic(out / "environment.json", {**environment(), **distributed.describe()})
    distributed.barrier()
    return ws


# ---- stages ----------------------------------------------------------------------------------

def dense_stage(ws: Workspace) -> tuple[nn.Module, dict]:
    """The trained dense model: ``--weights``, or pre-trained here and cached for the next run."""
    model = ws.spec.build()
    with ws.timed("pretrain"):
        if ws.cfg.weights:
            try:
                state = torch.load(ws.cfg.weights, map_location="cpu", weights_only=True)
                model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            except Exception as e:
                raise BadInput(f"cannot load --weights {ws.cfg.weights} into {ws.spec.name} ({str(e)[:120]}): "
                               "pass a matching state_dict") from None
            return model.eval(), {"source": str(ws.cfg.weights)}
        key = {"model": dataclasses.asdict(ws.spec), "data": ws.data.source, "data_cfg": dataclasses.asdict(ws.cfg.data)}
        model, info = pretrained(model, ws.data, ws.cfg.pretrain, ws.cache, key, ws.cfg.seed, ws.cfg.progress)
    return model.eval(), info


def profile_stage(ws: Workspace, dense: nn.Module) -> LatencyTable:
    """The latency table: ``--table``, the cache's, or measured now; validated end to end on
    ``--validate K`` random pruned configurations when asked (the error is stored in the table)."""
    fp = ws.backend.fingerprint(ws.input_shape)
    source = None
    if ws.cfg.table:
        table = LatencyTable.load(ws.cfg.table)
        table.check_compatible(fp, ws.cfg.force)
    else:
        sigs = {n: s.key for n, s in layer_signatures(dense, ws.input_shape).items()}
        key = cache_key(fp=dataclasses.asdict(fp), layers=sigs, profile=ws.cfg.profile.measurement_key(),
                        schema=SCHEMA_VERSION)
        source = ws.cache / "tables" / f"{ws.spec.name.replace(':', '_')}-{key}.json"
        if source.exists():
            table = LatencyTable.load(source)
            log.info("using cached latency table %s", source)
        else:
            with ws.timed("profile"):
                table = profile_model(dense, ws.input_shape, ws.backend, ws.cfg.profile, ws.cfg.progress)
            table.save(source)
    k = ws.cfg.profile.validate
    if k and (table.meta.get("validation") or {}).get("k", 0) < k:
        with ws.timed("validate"):
            table.meta["validation"] = validate_table(dense, table, ws.backend, ws.input_shape, k, ws.cfg.profile.step,
                                                      ws.cfg.profile.pair, seed=ws.cfg.seed, progress=ws.cfg.progress)
        if source is not None:
            table.save(source)
    table.save(ws.run_dir / "table.json")
    plot_staircases(table, ws.run_dir / "table_staircases.png")
    if table.meta.get("validation"):
        plot_validation(table, ws.run_dir / "table_validation.png")
    return table


def plan_stage(ws: Workspace, dense: nn.Module, table: LatencyTable) -> CalibratedPlan:
    cfg = ws.cfg
    if cfg.budget.ms is not None:
        wanted = cfg.budget.ms / table.dense_ms
        if wanted > 1:
            log.warning("budget %.3f ms is above the dense latency %.3f ms", cfg.budget.ms, table.dense_ms)
        wanted = min(wanted, 1.0)
    else:
        wanted = cfg.budget.fraction
    key, done = ws.stage_key("plan", table=table.measurements(), wanted=wanted, plan=dataclasses.asdict(cfg.plan),
                             budget=dataclasses.asdict(cfg.budget), dense=_dense_identity(cfg),
                             target=[cfg.schedule.target, cfg.schedule.param_ratio])
    if done and (ws.run_dir / "plan.json").exists():
        d = json.loads((ws.run_dir / "calibration.json").read_text())
        e2e = EndToEnd.from_dict(d["e2e"]) if d.get("e2e") else None
        return CalibratedPlan(PruningPlan.load(ws.run_dir / "plan.json"), d["wanted_ratio"], d["measured_ratio"],
                              d["history"], e2e)
    batches = None
    if cfg.plan.importance == "taylor":
        batches = list(ws.data.batches(ws.data.train, cfg.finetune.batch_size, limit=cfg.plan.taylor_batches * cfg.finetune.batch_size))
    with ws.timed("plan"):
        if cfg.schedule.target == "params":  # AdaSAP_P: a parameter ratio, no latency budget to calibrate
            p0 = count_params(dense)
            plan = build_param_plan(dense, table, cfg.plan, ws.input_shape, max_params=int(cfg.schedule.param_ratio * p0),
                                    batches=batches)
            cal = CalibratedPlan(plan, plan.predicted_ms / table.dense_ms, None, [])
        else:
            cal = plan_to_budget(dense, table, wanted, cfg.plan, ws.backend, ws.input_shape,
                                 cfg.budget.calibrate_iters, (cfg.budget.window_low, cfg.budget.window_high),
                                 cfg.budget.timing, batches=batches)
    cal.plan.save(ws.run_dir / "plan.json")
    write_json_atomic(ws.run_dir / "calibration.json",
                      {"wanted_ratio": cal.wanted_ratio, "measured_ratio": cal.measured_ratio, "history": cal.history,
                       "e2e": cal.e2e.to_dict() if cal.e2e else None})
    ws.done("plan", key)
    return cal


def _dense_identity(cfg: RunConfig) -> dict[str, Any]:
    if cfg.weights:  # the seed and pre-training settings do not make this model
        return {"model": cfg.model, "weights": str(Path(cfg.weights).resolve()), "data": dataclasses.asdict(cfg.data)}
    return {"model": cfg.model, "weights": None, "pretrain": dataclasses.asdict(cfg.pretrain),
            "data": dataclasses.asdict(cfg.data), "seed": cfg.seed}


def prune_stage(ws: Workspace, dense: nn.Module, table: LatencyTable, cal: CalibratedPlan) -> tuple[nn.Module, dict]:
    """Warm up, prune on the schedule to the validated target (physically), fine-tune; save the
    compact model (arch + weights)."""
    cfg = ws.cfg
    key, done = ws.stage_key("prune", target=cal.plan.to_dict(), plan=dataclasses.asdict(cfg.plan),
                             schedule=dataclasses.asdict(cfg.schedule), sharpness=dataclasses.asdict(cfg.sharpness),
                             finetune=dataclasses.asdict(cfg.finetune), seed=cfg.seed, dense=_dense_identity(cfg))
    if done and (ws.run_dir / "arch.json").exists():
        return load_compact(ws.run_dir), json.loads((ws.run_dir / "training.json").read_text())
    compact = copy.deepcopy(dense)
    probe_file = ws.run_dir / "step_time.json"  # measured once per run, so a resumed run does not re-time it
    probe = json.loads(probe_file.read_text()) if probe_file.exists() else {}
    if probe.get("key") != key:
        with ws.timed("step_time_probe"):
            probe = distributed.on_main(lambda: {"key": key, "ratio": step_time_ratio(
                compact, ws.data, cfg.sharpness, cfg.finetune, ws.input_shape)})
        if distributed.is_main():
            write_json_atomic(probe_file, probe)
    with ws.timed("train_and_prune"):
        res = train_and_prune_(compact, ws.data, cal.table(table), cal.plan, cfg.plan, cfg.schedule, cfg.sharpness,
                               cfg.finetune, ws.input_shape, cfg.seed, cfg.progress,
                               checkpoint=ws.run_dir / "training.ckpt.pt", key=key)
    info = {"method": cfg.sharpness.method, "target": cfg.schedule.target, "importance": cfg.plan.importance,
            "step_time_ratio": probe["ratio"], "predicted_ms": res.final_predicted_ms,
            "prune_history": res.history, "phases": res.phases, "sharpness": res.sharpness, "resumed": res.resumed}
    if distributed.is_main():
        save_compact(compact, ws.spec, ws.run_dir)
        write_json_atomic(ws.run_dir / "training.json", info)
        ws.done("prune", key)
    return compact.eval(), info


@dataclasses.dataclass(frozen=True)
class ExportResult:
    dense: OnnxArtifact
    compact: OnnxArtifact
    parity: Parity
    shrink: dict[str, Any]
    contract: dict[str, Any]
    tensorrt: dict[str, Any] | None = None  # runtime trt only (unverified on a GPU)


def export_stage(ws: Workspace, dense: nn.Module, compact: nn.Module) -> ExportResult:
    """Both models to single-file ONNX with the preprocessing contract; the dense weights saved
    beside the compact ones (``latprune.load(run_dir, "dense")``); parity on real test batches; the
    compact file must be smaller; TensorRT engines when the runtime is ``trt``. Failed checks are
    recorded for the report's gates, not raised."""
    cfg = ws.cfg
    shape = (cfg.deploy.batch, *ws.input_shape)
    contract = ws.data.preprocessing()
    meta = contract_metadata(contract, model=ws.spec.name, version=latprune_version(),
                             batch="dynamic" if cfg.deploy.dynamic_batch else str(cfg.deploy.batch))
    with ws.timed("export"):
        d = export_onnx(dense, ws.run_dir / "dense.onnx", shape, cfg.deploy.opset, meta, cfg.deploy.dynamic_batch)
        c = export_onnx(compact, ws.run_dir / "model.onnx", shape, cfg.deploy.opset, meta, cfg.deploy.dynamic_batch)
        save_atomic(dense.state_dict(), ws.run_dir / "dense.pt")
        n = max(cfg.verify.parity_images // cfg.deploy.batch, 1) * cfg.deploy.batch
        batches = [x for x, _ in ws.data.batches(ws.data.test, cfg.deploy.batch, limit=n) if len(x) == cfg.deploy.batch]
        if not batches:
            raise BadInput(f"the test set has fewer images than --deploy-batch {cfg.deploy.batch}: lower --deploy-batch")
        if cfg.deploy.dynamic_batch:  # the dynamic axis must work at other sizes too
            batches.append(batches[0][:1])
        parity = check_parity(compact, c.path, batches, cfg.verify.atol, cfg.verify.rtol)
        (log.info if parity.ok else log.error)("parity: %s", parity.message())
        shrink = check_shrink(d, c, count_params(dense), count_params(compact))
        trt = _tensorrt_export(ws, d.path, c.path, [b.numpy() for b in batches[:2]]) if cfg.deploy.runtime == "trt" else None
    return ExportResult(d, c, parity, shrink, contract, trt)


def _tensorrt_export(ws: Workspace, dense_onnx: Path, compact_onnx: Path, batches) -> dict[str, Any]:
    """Engines (dense and compact, one timing cache), layer information, parity against ONNX
    Runtime, GPU compute and end-to-end latency. Unverified on a GPU (export/tensorrt.py)."""
    from latprune.export.tensorrt import UNVERIFIED, TrtConfig, build_engines, engine_latency, engine_parity

    eng = build_engines({"dense": dense_onnx, "model": compact_onnx}, ws.run_dir, TrtConfig(fp16=ws.cfg.deploy.fp16))
    parity = engine_parity(eng["model"].path, compact_onnx, batches, ws.cfg.deploy.fp16)
    latency = {k: engine_latency(e.path) for k, e in eng.items()}
    return {"engines": {k: e.to_dict() for k, e in eng.items()}, "parity": parity.to_dict(), "latency": latency,
            "verified_on_gpu": False, "note": UNVERIFIED}


def verify_stage(ws: Workspace, ex: ExportResult, dense: nn.Module, compact: nn.Module) -> SpeedResult:
    """Dense and compact timed interleaved on the deployment runtime. With runtime ``trt`` the
    backend builds its own engines from the ONNX files: the export stage's engines are not reused
    (a second build of each; unverified on a GPU, like the rest of that path)."""
    a, b = (ex.dense.path, ex.compact.path) if ws.backend.loads_onnx else (dense, compact)
    with ws.timed("verify"):
        return measure_speedup(ws.backend, a, b, ws.input_shape, ws.cfg.verify.timing)


def report_stage(ws: Workspace, dense: nn.Module, compact: nn.Module, table: LatencyTable, cal: CalibratedPlan,
                 ex: ExportResult, speed: SpeedResult, pre: dict, ft: dict) -> dict[str, Any]:
    cfg, fp = ws.cfg, ws.backend.fingerprint(ws.input_shape)
    dense_ms, compact_ms = speed.dense["median_ms"], speed.compact_ms
    example = torch.zeros(1, *ws.input_shape)
    d_macs, d_params = tp.utils.count_ops_and_params(dense, example)
    c_macs, c_params = tp.utils.count_ops_and_params(compact, example)
    with ws.timed("evaluate"):
        d_acc, c_acc = evaluate(dense, ws.data, ws.data.test), evaluate(compact, ws.data, ws.data.test)
    robustness = None
    if cfg.robustness.images:
        with ws.timed("robustness"):
            clean, corrupted = corrupted_test_set(ws.data, cfg.robustness.images, ws.cache, cfg.seed, cfg.progress)
            rd = evaluate_robustness(dense, ws.data, clean, corrupted)
            rc = evaluate_robustness(compact, ws.data, clean, corrupted)
        robustness = {**dataclasses.asdict(rc), "dense": dataclasses.asdict(rd), "suite": "CIFAR-10-C-style "
                      "(imagecorruptions-imaug: 15 corruptions x 5 severities)"}
    with ws.timed("layer_check"):  # every compact layer timed at its widths, against the table
        layers = check_layers(compact, table, ws.backend, ws.input_shape)
    factory = (lambda path, prefix: ws.backend.session(path, prefix)) if hasattr(ws.backend, "session") else None
    why = diagnose(dense, compact, cal.table(table), cal.plan.unpruned, cal.plan.round_to, ws.input_shape, fp, ws.backend.provider,
                   ex.compact.path, factory)

    def channels(m):
        return {n: (mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features)
                for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}

    report = {
        "model": ws.spec.name, "data": ws.data.name,
        "budget": _budget(cfg, dense_ms, compact_ms, int(d_params), int(c_params)),
        "dense": {"latency_ms": dense_ms, "latency_p90_ms": speed.dense["p90_ms"], "cv": speed.dense["cv"],
                  "predicted_ms": table.dense_ms, "accuracy": d_acc, "params": int(d_params),
                  "macs": int(d_macs), "channels": channels(dense), "pretrain": pre},
        "compact": {"latency_ms": compact_ms, "latency_pooled_median_ms": speed.compact["median_ms"],
                    "latency_p90_ms": speed.compact["p90_ms"], "cv": speed.compact["cv"],
                    "predicted_ms": ft["predicted_ms"] * dense_ms / table.dense_ms,
                    "predicted_ratio": ft["predicted_ms"] / table.dense_ms,
                    "accuracy": c_acc, "params": int(c_params), "macs": int(c_macs),
                    "channels": channels(compact)},
        "training": ft,
        "robustness": robustness,
        "speedup": speed.speedup, "speedup_ci95": list(speed.speedup_ci95),
        "parity": ex.parity.to_dict(),
        "onnx": {"dense": ex.dense.to_dict(), "compact": ex.compact.to_dict(), "shrink": ex.shrink,
                 "contract": ex.contract},
        "tensorrt": ex.tensorrt,
        "layer_latency": layers,
        "why_not_faster": why,
        "runtime": {"name": _RUNTIME_NAMES[fp.runtime.split("-")[0]], "backend": fp.runtime, "version": fp.runtime_version,
                    "provider": fp.provider, "threads": fp.threads, "batch": fp.batch,
                    "input_shape": [fp.batch, *fp.input_shape], "device": fp.device, "dtype": fp.dtype},
        "plan": {"importance": cal.plan.importance, "round_to": cal.plan.round_to,
                 "table_target_ms": cal.plan.target_ms, "table_predicted_ms": cal.plan.predicted_ms,
                 "table_layers_ms": cal.plan.layers_ms, "e2e": cal.plan.e2e, "unpruned": cal.plan.unpruned,
                 "knapsack_iterations": cal.plan.iterations,
                 "calibration": cal.history, "calibrated_ratio": cal.measured_ratio},
        "table": {"entries": table.meta.get("entries"), "dense_ms_at_profile": table.dense_ms,
                  "e2e": {"intercept_ms": table.e2e.intercept_ms, "slope": table.e2e.slope,
                          "points": len(table.e2e.points)},
                  "validation": _validation_summary(table), "unmeasured": table.meta.get("unmeasured", {})},
        "verify": {"pair_ratios": speed.repeats, "timing": dataclasses.asdict(cfg.verify)},
        "seed": cfg.seed, "stage_seconds": dict(ws.seconds), "environment": environment(),
        "artifacts": sorted(p.name for p in ws.run_dir.iterdir() if not p.name.startswith(".")),
    }
    report["gates"] = _gates(cfg, report)
    return report


def _gates(cfg: RunConfig, r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every deployment gate with its verdict, in the order their exit status is chosen."""
    p, sh, b = r["parity"], r["onnx"]["shrink"], r["budget"]
    gates = [{"name": "parity", "ok": p["ok"], "detail": p["detail"]},
             {"name": "onnx_shrink", "ok": sh["ok"], "detail": sh.get("detail") or
              f"model.onnx is {sh['ratio']:.2f} of dense.onnx ({sh['compact_bytes']:,} / {sh['dense_bytes']:,} bytes)"}]
    if r.get("tensorrt"):
        tp = r["tensorrt"]["parity"]
        gates.append({"name": "tensorrt_parity", "ok": tp["ok"], "detail": tp["detail"]})
    if b["target"] == "params":
        gates.append({"name": "params", "ok": b["met"], "limit": b["param_ratio"], "value": b["achieved_param_ratio"],
                      "detail": f"kept parameter ratio {b['achieved_param_ratio']:.3f} for at most {b['param_ratio']:.3f}"})
    else:
        c = r["compact"]["latency_ms"]
        gates.append({"name": "latency", "ok": b["met"], "limit": b["target_ms"], "value": c,
                      "detail": f"compact {c:.3f} ms for a budget of {b['target_ms']:.3f} ms"})
    limit = cfg.gates.max_accuracy_drop
    if limit is not None:
        drop = r["dense"]["accuracy"] - r["compact"]["accuracy"]
        gates.append({"name": "accuracy", "ok": drop <= limit + 1e-12, "limit": limit, "value": drop,
                      "detail": f"clean accuracy {r['dense']['accuracy']:.4f} -> {r['compact']['accuracy']:.4f}: "
                                f"drop {drop:.4f} for at most {limit:.4f}"})
    limit, rob = cfg.gates.corruption_limit, r.get("robustness")
    if limit is not None and rob:
        drop = rob["dense"]["corruption_acc"] - rob["corruption_acc"]
        gates.append({"name": "corruption_accuracy", "ok": drop <= limit + 1e-12, "limit": limit, "value": drop,
                      "detail": f"corruption accuracy {rob['dense']['corruption_acc']:.4f} -> {rob['corruption_acc']:.4f}: "
                                f"drop {drop:.4f} for at most {limit:.4f}"})
    return gates


_RUNTIME_NAMES = {"ort": "onnxruntime", "torch": "torch", "trt": "tensorrt"}


def _validation_summary(table: LatencyTable) -> dict[str, Any] | None:
    v = table.meta.get("validation")
    return None if v is None else {k: v[k] for k in ("k", "median_rel_err", "p90_rel_err", "max_rel_err")}


def _budget(cfg: RunConfig, dense_ms: float, compact_ms: float, d_params: int, c_params: int) -> dict[str, Any]:
    if cfg.schedule.target == "params":
        ratio = c_params / d_params
        return {"target": "params", "param_ratio": cfg.schedule.param_ratio, "achieved_param_ratio": ratio,
                "met": ratio <= cfg.schedule.param_ratio, "fraction": None, "target_ms": None, "requested_ms": None}
    target = cfg.budget.ms if cfg.budget.ms is not None else cfg.budget.fraction * dense_ms
    return {"target": "latency", "fraction": cfg.budget.fraction if cfg.budget.ms is None else target / dense_ms,
            "target_ms": target, "requested_ms": cfg.budget.ms, "met": compact_ms <= target}


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    report_path: Path | None  # None on the ranks other than 0 under torchrun: rank 0 reports
    report: dict[str, Any] | None

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in (self.report or {}).get("gates", []) if not g["ok"]]

    @property
    def exit_code(self) -> int:
        """0, or the status of the first failed gate (parity 3, latency 4, accuracy 5)."""
        failed = self.failed_gates
        return GATE_EXIT[failed[0]["name"]] if failed else 0


def run(cfg: RunConfig) -> RunResult:
    """``latprune run``: the whole pipeline. Raises BadInput (2) and ParityError (3)."""
    ws = prepare(cfg)
    with ws.removed_on_bad_input():
        dense, pre = dense_stage(ws)  # under torchrun: every rank (pre-training is data-parallel too)
        table = distributed.main_first(lambda: profile_stage(ws, dense))  # rank 0 measures, the others read
        cal = distributed.main_first(lambda: plan_stage(ws, dense, table))
        compact, ft = prune_stage(ws, dense, table, cal)  # every rank trains; rank 0 writes
        if not distributed.is_main():
            return RunResult(ws.run_dir, None, None)
        ex = export_stage(ws, dense, compact)
        speed = verify_stage(ws, ex, dense, compact)
        report = report_stage(ws, dense, compact, table, cal, ex, speed, pre, ft)
        path = write_report(ws.run_dir, report)
    return RunResult(ws.run_dir, path, report)
