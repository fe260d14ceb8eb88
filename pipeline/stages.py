"""The pipeline's stages: one function per stage, typed artifacts in, a typed artifact out.

| stage | takes | returns (and writes into the run directory) |
|---|---|---|
| :func:`prepare` | :class:`RunConfig` | :class:`Inputs` (validated) and :class:`RunDir` (``config.json``) |
| :func:`dense_stage` | inputs | :class:`DenseModel` (``--weights``, or pre-trained and cached) |
| :func:`profile_stage` | dense model | :class:`LatencyTable` (``table.json``, plots) |
| :func:`plan_stage` | dense model, table | :class:`CalibratedPlan` (``plan.json``, ``calibration.json``) |
| :func:`prune_stage` | dense model, plan | :class:`CompactModel` (``model.pt``, ``arch.json``, ``training.json``) |
| :func:`export_stage` | dense, compact | :class:`ExportResult` (``dense.onnx``, ``model.onnx``, ``dense.pt``; int8) |
| :func:`verify_stage` | export | :class:`SpeedResult` (dense and compact timed interleaved, as deployed) |
| :func:`precision_stage` | export | int8: dense and compact in fp32 and int8 timed side by side |
| :func:`evaluate_stage` | dense, compact, export | :class:`Evaluation` (accuracy, corruption accuracy, size) |
| :func:`diagnose_stage` | dense, compact, plan, export | :class:`Diagnosis` (per-layer timing, "why not faster") |

Each stage that writes an artifact keys it by its inputs in ``stages.json``; running again with the
same ``--out`` reuses every artifact whose inputs did not change. A run that fails on bad input
removes the directory it created (:meth:`RunDir.removed_on_bad_input`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import logging
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from latprune.errors import BadInput, CannotWrite, one_line
from latprune.export.int8 import INT8_FILES, OnnxClassifier, export_int8, int8_parity
from latprune.export.onnx_export import OnnxArtifact, check_shrink, contract_metadata, export_onnx
from latprune.export.parity import Parity, check_parity
from latprune.export.tensorrt import UNVERIFIED, build_engines, engine_latency, engine_parity
from latprune.io import cache_key, check_file, check_writable_dir, save_torch_atomic, seal, verified, write_json_atomic
from latprune.latency_tables.device import environment, latprune_version
from latprune.latency_tables.endtoend import (
    PairConfig,
    SpeedResult,
    measure_side_by_side,
    measure_speedup,
    validate_table,
)
from latprune.latency_tables.plots import plot_staircases, plot_validation
from latprune.latency_tables.profile import check_layers, layer_signatures, lines_through, profile_model
from latprune.latency_tables.runtimes import Backend, get_backend
from latprune.latency_tables.runtimes.tensorrt import TensorrtBackend, TrtConfig
from latprune.latency_tables.store import STORE_NAME, LatencyStore
from latprune.latency_tables.table import SCHEMA_VERSION, EndToEnd, LatencyTable
from latprune.models.arch import load_compact, save_compact
from latprune.models.graph import ModelGraph
from latprune.models.registry import ModelSpec, bundled_weights
from latprune.pipeline import distributed
from latprune.pipeline.calibrate import LIGHT_TIMING, CalibratedPlan, plan_to_budget
from latprune.pipeline.config import RunConfig
from latprune.pipeline.data import Dataset, load_dataset
from latprune.pipeline.diagnose import diagnose
from latprune.pipeline.plan import PruningPlan, build_param_plan, count_params
from latprune.pipeline.robustness import Robustness, corrupted_test_set, evaluate_robustness
from latprune.pipeline.schedule import LatencyGoal, TrainPruneConfig, floors_at_plan, step_time_ratio, train_and_prune_
from latprune.pipeline.train import evaluate, pretrained

__all__ = ["Inputs", "RunDir", "DenseModel", "CompactModel", "Int8Export", "ExportResult", "Evaluation", "Diagnosis",
           "prepare", "untrained_dense", "dense_stage", "profile_stage", "plan_stage", "prune_stage", "export_stage",
           "verify_stage", "precision_stage", "evaluate_stage", "diagnose_stage"]

log = logging.getLogger(__name__)


# ---- what every stage reads and where it writes ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inputs:
    """The validated inputs of a run: its config, data, dense model spec, deployment runtime and the
    model's input shape. ``data`` is None when ``latprune profile`` runs without data (``--input-size``)."""

    cfg: RunConfig
    data: Dataset | None
    spec: ModelSpec
    backend: Backend
    input_shape: tuple[int, int, int]

    @property
    def cache(self) -> Path:
        return Path(self.cfg.cache_dir).expanduser()


@dataclasses.dataclass
class RunDir:
    """The run directory: its stage keys (``stages.json``), stage timers and clean-up on bad input."""

    path: Path
    created: bool = False  # by this run (removed again if the run fails on bad input)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def stage_key(self, stage: str, **inputs: Any) -> tuple[str, bool]:
        """The key of a stage's inputs, and whether the run dir holds an artifact made from them."""
        key = cache_key(**inputs)
        return key, self._keys().get(stage) == key

    def done(self, stage: str, key: str) -> None:
        write_json_atomic(self.path / "stages.json", {**self._keys(), stage: key})

    def _keys(self) -> dict[str, str]:
        p = self.path / "stages.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @contextlib.contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def removed_on_bad_input(self):
        """A run this call created is removed again if it fails on bad input; not on a failed write
        (a full disk): what it finished is kept, and the same command resumes from it."""
        try:
            yield
        except BadInput as e:
            if self.created and not isinstance(e, CannotWrite):
                shutil.rmtree(self.path, ignore_errors=True)
            raise


def prepare(cfg: RunConfig, profile_only: bool = False) -> tuple[Inputs, RunDir]:
    """Validate everything that can be validated before writing a single file, then create the run
    directory with ``config.json`` and ``environment.json``. ``profile_only``: the run stops after
    the table, so ``--input-size`` may stand in for the data (latency depends on shapes alone)."""
    check_writable_dir(cfg.cache_dir, "--cache-dir")
    if cfg.out:
        check_writable_dir(cfg.out, "--out")
    if cfg.weights:
        check_file(cfg.weights, "--weights", "a state_dict saved with torch.save (.pt)")
    if cfg.table:
        check_file(cfg.table, "--table", "a latency table.json written by `latprune profile`")
    if cfg.data.input_size and not profile_only:
        raise BadInput("--input-size profiles without data, so it applies to `latprune profile` alone: training "
                       "needs --data (whose images give the input size)")
    if cfg.data.input_size:  # no image is read: the table needs the shapes only
        data, shape = None, (3, cfg.data.input_size, cfg.data.input_size)
        spec = ModelSpec(cfg.model, cfg.data.num_classes or 1000)
    else:
        data = load_dataset(cfg.data, cache_dir=Path(cfg.cache_dir).expanduser())
        spec, shape = ModelSpec(cfg.model, data.num_classes), data.input_shape
    # unknown names, broken factories and graphs torch-pruning cannot trace fail here, before pre-training
    # or profiling (the trace takes a second; the dense stage traces its trained model again)
    with torch.random.fork_rng():  # the run's own random state is left as it was
        ModelGraph(spec.build(), shape)
    backend = get_backend(cfg.deploy.runtime, cfg.deploy.threads, cfg.deploy.batch, precision=cfg.deploy.precision)
    if cfg.table:
        LatencyTable.load(cfg.table).check_compatible(backend.fingerprint(shape), cfg.force)
    if cfg.gates.max_corruption_drop is not None and not cfg.robustness.images:
        raise BadInput("a corruption-accuracy gate needs the corruption evaluation: set --robust-images > 0 "
                       "(or drop --max-corruption-drop)")
    out = Path(distributed.broadcast(cfg.out or f"runs/{cfg.model.replace(':', '_').replace('/', '_')}-"
                                                 f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"))
    created = distributed.broadcast(not out.exists())
    distributed.barrier()  # every rank has looked before rank 0 creates it
    cfg = dataclasses.replace(cfg, out=str(out))
    rd = RunDir(out, created and distributed.is_main())
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".*.tmp"):  # a write that a kill cut short never reached its final name
            log.info("removing %s, left by an interrupted write", tmp.name)
            tmp.unlink(missing_ok=True)
        write_json_atomic(out / "config.json", cfg.to_dict())
        write_json_atomic(out / "environment.json", {**environment(), **distributed.describe()})
    distributed.barrier()
    return Inputs(cfg, data, spec, backend, shape), rd


# ---- artifacts -----------------------------------------------------------------------------

@dataclasses.dataclass
class DenseModel:
    model: nn.Module  # eval mode
    graph: ModelGraph  # its dependency graph, traced once
    info: dict[str, Any]  # where the weights came from (report.json dense.pretrain)


@dataclasses.dataclass
class CompactModel:
    model: nn.Module  # eval mode, channels physically removed
    graph: ModelGraph
    training: dict[str, Any]  # report.json "training"


@dataclasses.dataclass(frozen=True)
class Int8Export:
    """``dense.int8.onnx`` and ``model.int8.onnx`` (``export.int8``), how they were quantized, and
    the compact file's top-1 parity with ``model.onnx``."""

    dense: OnnxArtifact
    compact: OnnxArtifact
    parity: Parity
    quantization: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.to_dict(), "compact": self.compact.to_dict(), "parity": self.parity.to_dict(),
                "quantization": self.quantization}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    dense: OnnxArtifact
    compact: OnnxArtifact
    parity: Parity
    shrink: dict[str, Any]
    contract: dict[str, Any]
    tensorrt: dict[str, Any] | None = None  # runtime trt only (unverified on a GPU)
    int8: Int8Export | None = None  # --precision int8

    @property
    def deployed(self) -> tuple[Path, Path]:
        """The dense and compact files as deployed (at int8, the QDQ files)."""
        if self.int8 is not None:
            return self.int8.dense.path, self.int8.compact.path
        return self.dense.path, self.compact.path


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Accuracy on the test set, corruption robustness and size of both models."""

    dense_accuracy: float
    compact_accuracy: float
    dense_params: int
    compact_params: int
    dense_macs: int
    compact_macs: int
    robustness: Robustness | None  # the compact model's; None with --robust-images 0
    dense_robustness: Robustness | None
    int8: dict[str, Any] | None = None  # --precision int8: the same of dense.int8.onnx and model.int8.onnx


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    layers: list[dict[str, Any]]  # every compact layer timed alone at its widths, beside the table
    why_not_faster: dict[str, Any]


# ---- stages --------------------------------------------------------------------------------

def untrained_dense(inp: Inputs) -> DenseModel:
    """The dense architecture with initial weights: enough to profile (latency does not depend on
    weight values)."""
    model = inp.spec.build().eval()
    return DenseModel(model, ModelGraph(model, inp.input_shape), {"source": "untrained (profile only)"})


def dense_stage(inp: Inputs, rd: RunDir) -> DenseModel:
    """The trained dense model: ``--weights``; the package's bundled weights for this model and
    dataset (``models.registry.BUNDLED_WEIGHTS``) unless ``bundled_weights`` is off; else pre-trained
    here and cached for the next run, from initial weights drawn with the run's seed (so a run
    pre-trains the same model in any process, and a killed pre-training restarts exactly)."""
    cfg = inp.cfg
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = inp.spec.build()
    with rd.timed("pretrain"):
        if cfg.weights:
            try:
                state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
                model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            except Exception as e:
                raise BadInput(f"cannot load --weights {cfg.weights} into {inp.spec.name} ({one_line(e, 160)}): "
                               "pass a matching state_dict") from None
            info = {"source": str(cfg.weights)}
        elif cfg.bundled_weights and (path := bundled_weights(inp.spec.name, inp.data.name, inp.spec.num_classes)):
            blob = path.read_bytes()
            model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
            info = {"source": "bundled", "path": str(path), "sha256": hashlib.sha256(blob).hexdigest()}
            log.info("dense model: the bundled %s (--no-bundled-weights pre-trains here instead)", path.name)
        else:
            key = {"model": dataclasses.asdict(inp.spec), "data": inp.data.source,
                   "data_cfg": dataclasses.asdict(cfg.data)}
            model, info = pretrained(model, inp.data, cfg.pretrain, inp.cache, key, cfg.seed, cfg.progress)
    model.eval()
    return DenseModel(model, ModelGraph(model, inp.input_shape), info)


def profile_stage(inp: Inputs, rd: RunDir, dense: DenseModel) -> LatencyTable:
    """The latency table: ``--table``, the cache's, or measured now; validated end to end on
    ``--validate K`` random pruned configurations when asked (the error is stored in the table)."""
    cfg, fp = inp.cfg, inp.backend.fingerprint(inp.input_shape)
    source = None
    if cfg.table:
        table = LatencyTable.load(cfg.table)
        table.check_compatible(fp, cfg.force)
    else:
        sigs = {n: s.key for n, s in layer_signatures(dense.model, inp.input_shape).items()}
        key = cache_key(fp=dataclasses.asdict(fp), layers=sigs, profile=cfg.profile.measurement_key(),
                        schema=SCHEMA_VERSION)
        source = inp.cache / "tables" / f"{inp.spec.name.replace(':', '_')}-{key}.json"
        if verified(source):
            table = LatencyTable.load(source)
            log.info("using cached latency table %s", source)
        else:
            with rd.timed("profile"), LatencyStore(inp.cache / STORE_NAME) as store:
                table = profile_model(dense.model, inp.input_shape, inp.backend, cfg.profile, cfg.progress,
                                      store=store)
            seal(table.save(source))
    k = cfg.profile.validate
    if k and (table.validation or {}).get("k", 0) < k:
        with rd.timed("validate"):
            table.meta["validation"] = validate_table(dense.graph, table, inp.backend, k, cfg.profile.step,
                                                      cfg.profile.pair, seed=cfg.seed, progress=cfg.progress)
        if source is not None:
            seal(table.save(source))
    table.save(rd / "table.json")
    plot_staircases(table, rd / "table_staircases.png")
    if table.validation:
        plot_validation(table, rd / "table_validation.png")
    return table


def _dense_identity(cfg: RunConfig, dense: DenseModel) -> dict[str, Any]:
    """What made the dense model, for stage keys: the run's seed and pre-training settings only when
    it was pre-trained here (with ``--weights`` or the bundled weights, a run with another seed reuses
    the plan: the budget's plan does not depend on the training seed)."""
    if cfg.weights:
        return {"model": cfg.model, "weights": str(Path(cfg.weights).resolve()), "data": dataclasses.asdict(cfg.data)}
    if dense.info.get("source") == "bundled":
        return {"model": cfg.model, "bundled": dense.info["sha256"], "data": dataclasses.asdict(cfg.data)}
    return {"model": cfg.model, "weights": None, "bundled": cfg.bundled_weights,
            "pretrain": dataclasses.asdict(cfg.pretrain), "data": dataclasses.asdict(cfg.data), "seed": cfg.seed}


def plan_stage(inp: Inputs, rd: RunDir, dense: DenseModel, table: LatencyTable) -> CalibratedPlan:
    """HALP's knapsack to the budget, closed against measured latency (``pipeline.calibrate``); the
    plan artifact carries the table with the corrected end-to-end term."""
    cfg = inp.cfg
    if cfg.budget.ms is not None:
        wanted = cfg.budget.ms / table.dense_ms
        if wanted > 1:
            log.warning("budget %.3f ms is above the dense latency %.3f ms", cfg.budget.ms, table.dense_ms)
        wanted = min(wanted, 1.0)
    else:
        wanted = cfg.budget.fraction
    key, done = rd.stage_key("plan", table=table.measurements(), wanted=wanted, plan=dataclasses.asdict(cfg.plan),
                             budget=dataclasses.asdict(cfg.budget), dense=_dense_identity(cfg, dense),
                             target=[cfg.schedule.target, cfg.schedule.param_ratio])
    if done and (rd / "plan.json").exists():
        d = json.loads((rd / "calibration.json").read_text())
        if d.get("table"):  # the table with the grid lines measured through the plan's widths
            corrected = LatencyTable.load(rd / d["table"])
        else:
            corrected = table.with_e2e(EndToEnd.from_dict(d["e2e"])) if d.get("e2e") else table
        return CalibratedPlan(PruningPlan.load(rd / "plan.json"), d["wanted_ratio"], d["measured_ratio"],
                              d["history"], corrected)
    batches = held_out = None
    if cfg.plan.plan_batches:  # a gradient criterion or the search: fixed training batches
        batches = list(inp.data.batches(inp.data.train, cfg.finetune.batch_size,
                                        limit=cfg.plan.plan_batches * cfg.finetune.batch_size))
    if cfg.plan.held_out_batches:  # sensitivity's loss and the search's scores: validation batches
        held_out = list(inp.data.batches(inp.data.val, cfg.finetune.batch_size,
                                         limit=cfg.plan.held_out_batches * cfg.finetune.batch_size))
    with rd.timed("plan"):
        if cfg.schedule.target == "params":  # AdaSAP_P: a parameter ratio, no latency budget to calibrate
            p0 = count_params(dense.model)
            plan = build_param_plan(dense.graph, table, cfg.plan, max_params=int(cfg.schedule.param_ratio * p0),
                                    batches=batches)
            cal = CalibratedPlan(plan, plan.predicted_ms / table.dense_ms, None, [], table)
        else:
            # grid lines through the planned widths are measured on this device only: never into a
            # table measured for another setting (--table ... --force)
            here = not table.fingerprint.mismatches(inp.backend.fingerprint(inp.input_shape))
            with contextlib.ExitStack() as stack:
                lines = None  # lines(table, layer_channels) -> (table, record)
                if cfg.budget.plan_lines and here:
                    lines = functools.partial(lines_through, dense.graph, backend=inp.backend, cfg=cfg.profile,
                                              store=stack.enter_context(LatencyStore(inp.cache / STORE_NAME)))
                cal = plan_to_budget(dense.graph, table, wanted, cfg.plan, inp.backend, cfg.budget.calibrate_iters,
                                     (cfg.budget.window_low, cfg.budget.window_high), cfg.budget.timing,
                                     batches=batches, held_out=held_out, lines=lines,
                                     line_rounds=cfg.budget.plan_lines)
    cal.plan.save(rd / "plan.json")
    refined = cal.table.layers is not table.layers
    if refined:
        cal.table.save(rd / "plan_table.json")
    write_json_atomic(rd / "calibration.json",
                      {"wanted_ratio": cal.wanted_ratio, "measured_ratio": cal.measured_ratio, "history": cal.history,
                       "e2e": cal.table.e2e.to_dict() if cal.table is not table else None,
                       "table": "plan_table.json" if refined else None})
    rd.done("plan", key)
    return cal


def prune_stage(inp: Inputs, rd: RunDir, dense: DenseModel, cal: CalibratedPlan) -> CompactModel:
    """Warm up, prune on the schedule to the validated target (physically), fine-tune; save the
    compact model (arch + weights)."""
    cfg = inp.cfg
    key, done = rd.stage_key("prune", target=cal.plan.to_dict(), plan=dataclasses.asdict(cfg.plan),
                             schedule=dataclasses.asdict(cfg.schedule), optimizer=dataclasses.asdict(cfg.optimizer),
                             finetune=dataclasses.asdict(cfg.finetune), seed=cfg.seed,
                             dense=_dense_identity(cfg, dense))
    if done and (rd / "arch.json").exists():
        compact = load_compact(rd.path)
        return CompactModel(compact, ModelGraph(compact, inp.input_shape),
                            json.loads((rd / "training.json").read_text()))
    compact = copy.deepcopy(dense.model)
    probe_file = rd / "step_time.json"  # measured once per run, so a resumed run does not re-time it
    probe = json.loads(probe_file.read_text()) if probe_file.exists() else {}
    if probe.get("key") != key:
        with rd.timed("step_time_probe"):
            probe = distributed.on_main(lambda: {"key": key, "ratio": step_time_ratio(
                compact, inp.data, cfg.optimizer, cfg.finetune, inp.input_shape)})
        if distributed.is_main():
            write_json_atomic(probe_file, probe)
    goal = None
    if cfg.schedule.target == "latency":  # every removal timed, and the result held to the budget

        def timer(pairs: PairConfig):
            def measure(m: nn.Module) -> float:
                probe = copy.deepcopy(m).eval()
                return measure_speedup(inp.backend, dense.model, probe, inp.input_shape, pairs).ratio

            return measure

        goal = LatencyGoal(timer(cfg.budget.timing), cal.wanted_ratio, (cfg.budget.window_low, cfg.budget.window_high),
                           measure_step=timer(LIGHT_TIMING))
    floored = floors_at_plan(cfg.schedule, cal.plan)
    if floored and not cfg.schedule.width_floor:
        log.info("the plan search chose the widths: every removal keeps each group at least as wide as the plan")
    with rd.timed("train_and_prune"):
        res = train_and_prune_(compact, inp.data, cal.table, cal.plan,
                               TrainPruneConfig(cfg.plan, cfg.schedule, cfg.optimizer, cfg.finetune), inp.input_shape,
                               seed=cfg.seed, progress=cfg.progress, checkpoint=rd / "training.ckpt.pt", key=key,
                               goal=goal)
    info = {"method": cfg.optimizer.method, "target": cfg.schedule.target, "importance": cfg.plan.importance,
            "emerging": not floored, "searched": bool(cal.plan.search), "step_time_ratio": probe["ratio"],
            "predicted_ms": res.final_predicted_ms, "prune_history": res.history, "corrections": res.corrections,
            "corrected_e2e": res.e2e, "phases": res.phases, "sharpness": res.sharpness, "resumed": res.resumed}
    if distributed.is_main():
        save_compact(compact, inp.spec, rd.path)
        write_json_atomic(rd / "training.json", info)
        rd.done("prune", key)
    compact.eval()
    return CompactModel(compact, ModelGraph(compact, inp.input_shape), info)


def export_stage(inp: Inputs, rd: RunDir, dense: DenseModel, compact: CompactModel) -> ExportResult:
    """Both models to single-file ONNX with the preprocessing contract; the dense weights saved
    beside the compact ones (``latprune.load_dense(run_dir)``); parity on real test batches; the
    compact file must be smaller; at int8 both files quantized (``export.int8``, calibrated on
    training images) with top-1 parity against the fp32 file; TensorRT engines when the runtime
    is ``trt``. Failed checks are recorded for the report's gates, not raised."""
    cfg = inp.cfg
    shape = (cfg.deploy.batch, *inp.input_shape)
    contract = inp.data.preprocessing()
    meta = contract_metadata(contract, model=inp.spec.name, version=latprune_version(),
                             batch="dynamic" if cfg.deploy.dynamic_batch else str(cfg.deploy.batch))
    with rd.timed("export"):
        d = export_onnx(dense.model, rd / "dense.onnx", shape, cfg.deploy.opset, meta, cfg.deploy.dynamic_batch)
        c = export_onnx(compact.model, rd / "model.onnx", shape, cfg.deploy.opset, meta, cfg.deploy.dynamic_batch)
        save_torch_atomic(dense.model.state_dict(), rd / "dense.pt")
        n = max(cfg.verify.parity_images // cfg.deploy.batch, 1) * cfg.deploy.batch
        batches = [x for x, _ in inp.data.batches(inp.data.test, cfg.deploy.batch, limit=n)
                   if len(x) == cfg.deploy.batch]
        if not batches:
            raise BadInput(f"the test set has fewer images than --deploy-batch {cfg.deploy.batch}: "
                           "lower --deploy-batch")
        if cfg.deploy.dynamic_batch:  # the dynamic axis must work at other sizes too
            batches.append(batches[0][:1])
        parity = check_parity(compact.model, c.path, batches, cfg.verify.atol, cfg.verify.rtol)
        (log.info if parity.ok else log.error)("parity: %s", parity.message())
        shrink = check_shrink(d, c, count_params(dense.model), count_params(compact.model))
        int8 = _int8_export(inp, rd, d, c, [b.numpy() for b in batches]) if cfg.deploy.precision == "int8" else None
        trt = None
        if inp.backend.name == TensorrtBackend.name:
            files = (int8.dense.path, int8.compact.path) if int8 else (d.path, c.path)
            trt = _tensorrt_export(rd, cfg.deploy.precision, *files, [b.numpy() for b in batches[:2]])
    return ExportResult(d, c, parity, shrink, contract, trt, int8)


def _int8_export(inp: Inputs, rd: RunDir, d: OnnxArtifact, c: OnnxArtifact, test_batches: list) -> Int8Export:
    """Both fp32 files quantized by ONNX Runtime's static QDQ quantization, calibrated on
    ``calibration_images`` training images (shuffled with the run's seed, without augmentation),
    and the compact int8 file's top-1 agreement with the compact fp32 file on the parity images."""
    cfg = inp.cfg.deploy
    rng = np.random.default_rng(inp.cfg.seed)
    calib = [x.numpy() for x, _ in inp.data.batches(inp.data.train, cfg.batch, shuffle=True, rng=rng,
                                                    limit=cfg.calibration_images)
             if cfg.dynamic_batch or len(x) == cfg.batch]
    source = (f"{sum(len(x) for x in calib)} training images of {inp.data.name}, drawn with seed {inp.cfg.seed}, "
              "preprocessed as deployed")
    quant = inp.backend.quant_config(cfg.calibration)
    dq = export_int8(d.path, rd / INT8_FILES["dense"], calib, quant, source)
    cq = export_int8(c.path, rd / INT8_FILES["compact"], calib, quant, source)
    parity = int8_parity(c.path, cq.path, test_batches, cfg.int8_min_top1, cfg.threads)
    (log.info if parity.ok else log.error)("int8 parity: %s", parity.message())
    return Int8Export(dq, cq, parity, {**quant.to_dict(), "calibration_images": sum(len(x) for x in calib),
                                       "source": source})


def _tensorrt_export(rd: RunDir, precision: str, dense_onnx: Path, compact_onnx: Path, batches) -> dict[str, Any]:
    """Engines (dense and compact, one timing cache; int8 from the QDQ files), layer information,
    parity against ONNX Runtime on the file they were built from, GPU compute and end-to-end
    latency. Unverified on a GPU (export/tensorrt.py)."""
    trt_cfg = TrtConfig(fp16=precision == "fp16", int8=precision == "int8")
    eng = build_engines({"dense": dense_onnx, "model": compact_onnx}, rd.path, trt_cfg)
    parity = engine_parity(eng["model"].path, compact_onnx, batches, precision)
    latency = {k: engine_latency(e.path) for k, e in eng.items()}
    return {"engines": {k: e.to_dict() for k, e in eng.items()}, "parity": parity.to_dict(), "latency": latency,
            "verified_on_gpu": False, "note": UNVERIFIED}


def verify_stage(inp: Inputs, rd: RunDir, ex: ExportResult, dense: DenseModel, compact: CompactModel) -> SpeedResult:
    """Dense and compact timed interleaved on the deployment runtime, as deployed (at int8 the
    QDQ files). With runtime ``trt`` the backend builds its own engines from the ONNX files: the
    export stage's engines are not reused (a second build of each; unverified on a GPU, like the
    rest of that path)."""
    a, b = ex.deployed if inp.backend.loads_onnx else (dense.model, compact.model)
    with rd.timed("verify"):
        return measure_speedup(inp.backend, a, b, inp.input_shape, inp.cfg.verify.timing)


def precision_stage(inp: Inputs, rd: RunDir, ex: ExportResult) -> dict[str, dict[str, Any]] | None:
    """At int8: dense and compact, fp32 and int8 (the exported files), timed side by side in the
    same sessions sets (``measure_side_by_side``), each as a ratio to dense fp32. None otherwise."""
    if ex.int8 is None:
        return None
    fp32 = get_backend(inp.cfg.deploy.runtime, inp.cfg.deploy.threads, inp.cfg.deploy.batch)  # files as they are
    files = {"dense_fp32": ex.dense.path, "dense_int8": ex.int8.dense.path, "compact_fp32": ex.compact.path,
             "compact_int8": ex.int8.compact.path}
    with rd.timed("precision_latencies"):
        return measure_side_by_side(fp32, files, inp.input_shape, inp.cfg.budget.timing)


def evaluate_stage(inp: Inputs, rd: RunDir, dense: DenseModel, compact: CompactModel,
                   ex: ExportResult | None = None) -> Evaluation:
    """Test accuracy, corruption accuracy (``--robust-images``) and size of both models; at int8
    the same evaluation of the deployed ``dense.int8.onnx`` and ``model.int8.onnx`` (ONNX Runtime)."""
    cfg, data = inp.cfg, inp.data
    example = torch.zeros(1, *inp.input_shape)
    d_macs, d_params = tp.utils.count_ops_and_params(dense.model, example)
    c_macs, c_params = tp.utils.count_ops_and_params(compact.model, example)
    with rd.timed("evaluate"):
        d_acc, c_acc = evaluate(dense.model, data, data.test), evaluate(compact.model, data, data.test)
    quantized = None
    if ex is not None and ex.int8 is not None:
        quantized = {k: OnnxClassifier(path, cfg.deploy.threads) for k, path in zip(("dense", "compact"), ex.deployed)}
        with rd.timed("evaluate"):
            int8 = {k: {"accuracy": evaluate(m, data, data.test), "robustness": None} for k, m in quantized.items()}
    dense_rob = compact_rob = None
    if cfg.robustness.images:
        with rd.timed("robustness"):
            clean, corrupted = corrupted_test_set(data, cfg.robustness.images, inp.cache, cfg.seed, cfg.progress)
            dense_rob = evaluate_robustness(dense.model, data, clean, corrupted)
            compact_rob = evaluate_robustness(compact.model, data, clean, corrupted, informative=dense_rob.informative)
            for k, m in (quantized or {}).items():
                rob = evaluate_robustness(m, data, clean, corrupted, informative=dense_rob.informative)
                int8[k]["robustness"] = dataclasses.asdict(rob)
    return Evaluation(d_acc, c_acc, int(d_params), int(c_params), int(d_macs), int(c_macs), compact_rob, dense_rob,
                      int8 if quantized else None)


def diagnose_stage(inp: Inputs, rd: RunDir, dense: DenseModel, compact: CompactModel, cal: CalibratedPlan,
                   ex: ExportResult) -> Diagnosis:
    """Every compact layer timed alone at its widths beside the table, and what limits the speed."""
    with rd.timed("layer_check"):
        layers = check_layers(compact.model, cal.table, inp.backend, inp.input_shape)
    be = inp.backend
    factory = (lambda path, prefix: be.session(path, prefix)) if hasattr(be, "session") else None
    why = diagnose(dense.graph, compact.graph, cal.table, cal.plan.unpruned, cal.plan.round_to,
                   be.fingerprint(inp.input_shape), be.provider, ex.deployed[1], factory)
    return Diagnosis(layers, why)
