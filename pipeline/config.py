"""The run configuration: one dataclass per stage, composed, validated, saved into every run dir.

Load order: defaults < ``--config`` YAML (nested by section, as written by ``to_dict``) < CLI flags.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from latprune.errors import BadInput
from latprune.io import check_file
from latprune.latency_tables.endtoend import PairConfig
from latprune.latency_tables.profile import ProfileConfig
from latprune.latency_tables.runtimes import PRECISIONS, RUNTIMES, runtime_class
from latprune.latency_tables.runtimes.quantize import CALIBRATION_METHODS
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.data import DataConfig
from latprune.pipeline.plan import PlanConfig
from latprune.pipeline.robustness import RobustnessConfig
from latprune.pipeline.schedule import ScheduleConfig
from latprune.pipeline.train import TrainConfig

__all__ = ["BudgetConfig", "DeployConfig", "VerifyConfig", "GateConfig", "RunConfig", "default_cache_dir",
           "load_config", "RENAMED_SECTIONS", "RETIRED_KEYS"]

# config sections renamed since an earlier release: {old: new}. Old run directories (config.json,
# --resume) and YAML files keep working, with a deprecation warning.
RENAMED_SECTIONS = {"sharpness": "optimizer"}
# settings that no longer exist: {(section, key): why}; dropped from old configs with a warning
RETIRED_KEYS = {("plan", "taylor_batches"): "the taylor criterion is retired ('taylor' now means 'halp', which "
                                            "scores on plan.halp_batches)"}

@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """``fraction`` of the measured dense latency, or an absolute ``ms`` (which wins if set)."""

    fraction: float | None = 0.5
    ms: float | None = None
    calibrate_iters: int = 4  # closed loop: measure the planned widths, re-solve if off target
    # before it: rounds of "plan, then measure the table's grid lines through the planned widths"
    # (latency_tables.profile.lines_through); 0: plan on the table as profiled
    plan_lines: int = 3
    # the closed loop accepts a plan measured in [window_low, window_high] x budget; the gap under
    # 1.0 is headroom for drift between this measurement and the final one
    window_low: float = 0.90
    window_high: float = 0.97
    calibrate_rounds: int = 7  # interleaved rounds per pair of sessions, per closed-loop measurement
    calibrate_round_s: float = 0.25
    calibrate_repeats: int = 2  # pairs of fresh sessions per measurement (more while noisy, up to 4)

    def __post_init__(self):
        if self.ms is not None:
            if not (isinstance(self.ms, (int, float)) and math.isfinite(self.ms) and self.ms > 0):
                raise BadInput(f"--budget-ms must be a positive number of milliseconds, got {self.ms}")
        elif self.fraction is None or not (0 < self.fraction <= 1):
            raise BadInput(
                f"budget must be in (0, 1] as a fraction of dense latency, got {self.fraction}: "
                "e.g. --budget 0.5, or give --budget-ms"
            )
        if not (0.5 <= self.window_low < self.window_high <= 1.0):
            raise BadInput(f"budget window must satisfy 0.5 <= window_low < window_high <= 1, got "
                           f"{self.window_low}, {self.window_high}")
        if self.calibrate_rounds < 1 or self.calibrate_round_s <= 0 or self.calibrate_repeats < 1:
            raise BadInput("calibrate rounds and repeats must be >= 1 and the round length > 0 s")
        if self.plan_lines < 0:
            raise BadInput(f"--plan-lines must be >= 0 (0: plan on the table as profiled), got {self.plan_lines}")
        if self.calibrate_iters < 0:
            raise BadInput(f"--calibrate-iters must be >= 0 (0: no closed loop), got {self.calibrate_iters}")

    @property
    def timing(self) -> PairConfig:
        return PairConfig(self.calibrate_rounds, self.calibrate_round_s, self.calibrate_repeats,
                          max(self.calibrate_repeats, 4))


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """Where and how the compact model is deployed. ``precision`` int8: the tables, the closed loop
    and the budget speak int8 latency, and ``model.int8.onnx`` is exported (``export.int8``: ONNX
    Runtime's static QDQ quantization in the runtime's form, ``Backend.quant_config``, calibrated
    on ``calibration_images`` training images with ``calibration``; parity is top-1 agreement with
    the fp32 file, at least ``int8_min_top1``). ``fp16`` is the older spelling of ``precision: fp16`` (configs and run
    directories written before issue 14 keep working)."""

    runtime: str = "ort"  # one of latency_tables.runtimes.RUNTIMES
    batch: int = 32
    threads: int = 2
    precision: str = "fp32"  # one of latency_tables.runtimes.PRECISIONS
    fp16: bool = False  # alias of precision fp16 (torch-cuda, ort-trt and trt only)
    calibration: str = "minmax"  # int8: one of runtimes.quantize.CALIBRATION_METHODS
    calibration_images: int = 512  # int8: training images the activation ranges are calibrated on
    int8_min_top1: float = 0.98  # int8 parity: top-1 agreement of model.int8.onnx with model.onnx
    dynamic_batch: bool = False  # ONNX export: the batch axis named "batch" instead of fixed
    opset: int = 17

    def __post_init__(self):
        if not (13 <= self.opset <= 21):
            raise BadInput(f"--opset must be between 13 and 21, got {self.opset}")
        if self.runtime not in RUNTIMES:
            raise BadInput(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.batch < 1 or self.threads < 1:
            raise BadInput(f"--deploy-batch and --threads must be >= 1, got {self.batch}, {self.threads}")
        if self.precision not in PRECISIONS:
            raise BadInput(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.fp16 and self.precision == "fp32":  # the alias
            object.__setattr__(self, "precision", "fp16")
        if self.fp16 != (self.precision == "fp16"):
            if self.fp16:
                raise BadInput(f"--fp16 and --precision {self.precision} disagree: give one of them")
            object.__setattr__(self, "fp16", self.precision == "fp16")
        runtime_class(self.runtime, precision=self.precision)  # fp16 / int8 only where the runtime has it
        if self.calibration not in CALIBRATION_METHODS:
            raise BadInput(f"--calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration!r}")
        if self.calibration_images < 1 or not (0 < self.int8_min_top1 <= 1):
            raise BadInput(f"--calibration-images must be >= 1 and --int8-min-top1 in (0, 1], got "
                           f"{self.calibration_images}, {self.int8_min_top1}")
        if self.precision == "int8" and not self.dynamic_batch and self.calibration_images < self.batch:
            raise BadInput(f"--calibration-images {self.calibration_images} is less than one deployment batch "
                           f"({self.batch}): the static-batch file is calibrated in whole batches; raise it")
        if self.dynamic_batch and runtime_class(self.runtime).static_shapes:
            raise BadInput("TensorRT engines here are built for static shapes (no optimisation profiles): "
                           "drop --dynamic-batch with this runtime")


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    """The final dense/compact timing: ``repeats`` pairs of fresh sessions (more, up to 5, while the
    speedup's interval is wider than +-3 %), each ``rounds`` interleaved rounds."""

    rounds: int = 11
    min_round_s: float = 0.4
    repeats: int = 3
    parity_images: int = 256  # test images torch and ONNX Runtime are compared on (whole batches)
    atol: float = 1e-4  # parity: |onnx - torch| <= atol + rtol |torch| for every output element
    rtol: float = 1e-4

    def __post_init__(self):
        if self.rounds < 1 or self.min_round_s <= 0 or self.repeats < 1:
            raise BadInput("--verify-rounds and verify repeats must be >= 1 and --verify-round-s > 0")
        if self.parity_images < 1 or self.atol < 0 or self.rtol < 0:
            raise BadInput("verify.parity_images must be >= 1 and the parity tolerances >= 0")

    @property
    def timing(self) -> PairConfig:
        return PairConfig(self.rounds, self.min_round_s, self.repeats, max(self.repeats, 5), max_ci=0.03)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Deployment gates next to the latency budget. Drops are dense minus compact accuracy, as
    fractions (0.01 = one point); None: no gate. ``max_corruption_drop`` defaults to
    ``max_accuracy_drop`` and is checked on the corruption accuracy (mean over the 75 corruptions)."""

    max_accuracy_drop: float | None = None
    max_corruption_drop: float | None = None

    def __post_init__(self):
        for k in ("max_accuracy_drop", "max_corruption_drop"):
            v = getattr(self, k)
            if v is not None and not (0 <= v <= 1):
                raise BadInput(f"--{k.replace('_', '-')} is a fraction of accuracy in [0, 1] (0.01 = one point), "
                               f"got {v}")

    @property
    def corruption_limit(self) -> float | None:
        return self.max_accuracy_drop if self.max_corruption_drop is None else self.max_corruption_drop


def default_cache_dir() -> str:
    return (os.environ.get("LATPRUNE_CACHE")
            or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "latprune"))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "resnet20"
    weights: str | None = None
    bundled_weights: bool = True  # no --weights: start from the package's trained weights where it has them
    data: DataConfig = DataConfig()
    deploy: DeployConfig = DeployConfig()
    budget: BudgetConfig = BudgetConfig()
    profile: ProfileConfig = ProfileConfig()
    # a run plans by the search (pipeline.search; BENCHMARKS.md, "The plan search"): 24 candidates
    plan: PlanConfig = PlanConfig(search_candidates=24)
    pretrain: TrainConfig = TrainConfig(epochs=3, lr=0.1)
    finetune: TrainConfig = TrainConfig(epochs=2, lr=0.02, warmup_iters=20)  # also warm-up and pruning phases
    schedule: ScheduleConfig = ScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()  # the step rule; "sharpness" is the probe (schedule)
    robustness: RobustnessConfig = RobustnessConfig()
    verify: VerifyConfig = VerifyConfig()
    gates: GateConfig = GateConfig()
    seed: int = 0
    out: str | None = None
    table: str | None = None  # use this latency table instead of profiling
    force: bool = False  # use a table measured for another setting
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BadInput(f"--seed must be an integer >= 0 (numpy's generators take no negative seed), "
                           f"got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        kwargs: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = dict(d or {})
        for old, new in RENAMED_SECTIONS.items():
            if old in d:
                warnings.warn(f"config section {old!r} is deprecated: it is called {new!r} now", DeprecationWarning,
                              stacklevel=2)
                if new in d:
                    raise BadInput(f"config has both {old!r} and {new!r}: keep only {new!r}")
                d[new] = d.pop(old)
        for (section, key), why in RETIRED_KEYS.items():
            if isinstance(d.get(section), dict) and key in d[section]:
                warnings.warn(f"config key {section}.{key} is ignored: {why}", DeprecationWarning, stacklevel=2)
                d[section] = {k: v for k, v in d[section].items() if k != key}
        for k, v in d.items():
            if k not in fields:
                raise BadInput(f"unknown config key {k!r}: valid keys are {', '.join(fields)}")
            default = getattr(cls(), k) if k != "cache_dir" else None
            if dataclasses.is_dataclass(default) and not isinstance(v, dict):
                raise BadInput(f"config section {k!r} must be a mapping of its settings, got {v!r}")
            if dataclasses.is_dataclass(default):
                sub = {f.name for f in dataclasses.fields(default)}
                bad = set(v) - sub
                if bad:
                    raise BadInput(f"unknown key(s) {sorted(bad)} in config section {k!r}: valid are {sorted(sub)}")
                hints = typing.get_type_hints(type(default))
                v = {kk: check_type(f"{k}.{kk}", hints[kk], vv) for kk, vv in v.items()}
                try:
                    v = dataclasses.replace(default, **v)
                except (TypeError, ValueError) as e:
                    raise BadInput(f"config section {k!r}: {e}") from None
            else:
                v = check_type(k, typing.get_type_hints(cls)[k], v)
            kwargs[k] = v
        return cls(**kwargs)

    def with_overrides(self, **sections: dict[str, Any]) -> "RunConfig":
        """``with_overrides(budget={'fraction': 0.3}, seed=1)``: replace fields, None values ignored."""
        d = self.to_dict()
        for k, v in sections.items():
            if isinstance(v, dict):
                d[k].update({kk: vv for kk, vv in v.items() if vv is not None})
            elif v is not None:
                d[k] = v
        return RunConfig.from_dict(d)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def check_type(where: str, hint: Any, v: Any) -> Any:
    """``v`` as the config field ``where`` of type ``hint`` takes it, or :class:`BadInput` naming the
    field: bool, int, float (finite; an int is accepted), str, and their optionals are checked here;
    other types (tuples, unions of several) are left to the dataclass's own validation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if v is None and len(args) < len(typing.get_args(hint)):
            return v
        return check_type(where, args[0], v) if len(args) == 1 else v
    if hint not in _TYPE_NAMES:
        return v
    ok = (isinstance(v, bool) if hint is bool else isinstance(v, str) if hint is str else
          isinstance(v, (int, float) if hint is float else int) and not isinstance(v, bool))
    if ok and hint is float and not math.isfinite(v):
        ok = False
    if not ok:
        raise BadInput(f"config {where} must be {_TYPE_NAMES[hint]}, got {v!r}: fix the flag or the YAML key")
    return v


def load_config(path: str | os.PathLike | None) -> RunConfig:
    if path is None:
        return RunConfig()
    import yaml

    check_file(path, "--config", "a YAML config file")
    try:
        d = yaml.safe_load(Path(path).read_text()) or {}
    except UnicodeDecodeError:
        raise BadInput(f"config file {path} is not text (not UTF-8): pass a YAML config file") from None
    except yaml.YAMLError as e:
        raise BadInput(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax") from None
    if not isinstance(d, dict):
        raise BadInput(f"config file {path} must hold a mapping of sections, got {type(d).__name__}")
    return RunConfig.from_dict(d)
