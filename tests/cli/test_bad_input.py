"""The bad-input matrix (issue 15): every flag of ``latprune run``, ``sweep`` and ``bench`` and every
key of the run's config dataclasses, given what a user produces by accident (missing, empty, wrong
type, wrong format, truncated, wrong shape, out of range, NaN), must end in exit 2, exactly one line
on stderr that is not a log record, no traceback, and no run directory or cache entry left behind.

The list of inputs is read from the CLI's own parser and the config dataclasses: a new flag or
config key without a case here fails ``test_every_flag_has_cases`` / ``test_every_config_key_has_a_case``.
Cases run in-process through ``main(argv)``; a few real subprocesses check the exit codes as a
shell sees them. Every case loads a tiny Fashion-MNIST-format folder, so the matrix takes seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import inspect
import pickle
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latprune.cli import _parser, main
from latprune.errors import BadInput
from latprune.models.registry import ModelSpec
from latprune.pipeline import run as run_module
from latprune.pipeline.config import RunConfig
from latprune.pipeline.pruner import LatencyPruner
from latprune.testing import fake_table, residual_net

FRAGMENT = "latprune"  # every error line starts with the program's name


# ---- inputs on disk ----------------------------------------------------------------------------

def _idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def fashion_folder(root: Path, n_train: int = 60, n_test: int = 20, labels_max: int = 9) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % (labels_max + 1))
    return root


def image_folder(root: Path, bad: str | None = None, empty_class: bool = False) -> Path:
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            if empty_class and split == "train" and c == "b":
                continue
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    if bad == "not an image":
        (root / "train" / "a" / "notes.png").write_text("not an image")
    if bad == "truncated":
        data = (root / "train" / "a" / "0.png").read_bytes()
        (root / "train" / "a" / "0.png").write_bytes(data[: len(data) // 2])
    return root


def cifar_folder(root: Path, damage: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": np.zeros((10, 3072), np.uint8), "labels": [i % 10 for i in range(10)]}
        if name == "data_batch_2" and damage == "wrong shape":
            d["data"] = np.zeros((10, 1024), np.uint8)
        if name == "data_batch_2" and damage == "labels out of range":
            d["labels"] = [12] * 10
        if name == "data_batch_2" and damage == "labels missing":
            del d["labels"]
        (root / name).write_bytes(pickle.dumps(d))
    if damage == "truncated":
        (root / "data_batch_3").write_bytes((root / "data_batch_3").read_bytes()[:100])
    if damage == "not a pickle":
        (root / "data_batch_3").write_bytes(b"\x00garbage" * 10)
    return root


def factories(tmp: Path) -> str:
    """A module of broken model factories on sys.path: its import name."""
    (tmp / "bad_factories.py").write_text(
        "import torch\n"
        "def raises(num_classes=10):\n    raise RuntimeError('weights file missing')\n"
        "def not_a_module(num_classes=10):\n    return 42\n"
        "def shuffle(num_classes=10):\n"
        "    import torchvision\n    return torchvision.models.shufflenet_v2_x0_5(num_classes=num_classes)\n")
    sys.path.insert(0, str(tmp))
    return "bad_factories"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every file a case points at, made once: good data, broken data, broken files."""
    t = tmp_path_factory.mktemp("inputs")
    w = {"data": str(fashion_folder(t / "fmnist")), "tmp": t, "mod": factories(t)}
    files = {"empty": b"", "garbage": b"\x00\x01garbage\xff" * 40, "text": b"hello\n"}
    for k, v in files.items():
        (t / k).write_bytes(v)
    weights = t / "weights.pt"
    torch.save(ModelSpec("resnet20", 10).build().state_dict(), weights)
    (t / "weights-truncated.pt").write_bytes(weights.read_bytes()[:5000])
    torch.save(ModelSpec("resnet56", 10).build().state_dict(), t / "weights-resnet56.pt")
    torch.save([1, 2, 3], t / "weights-list.pt")
    (t / "table.json").write_text('{"header": {"schema": 9')
    (t / "table-list.json").write_text("[1, 2, 3]")
    (t / "config-list.yaml").write_text("- 1\n- 2\n")
    (t / "config-broken.yaml").write_text("budget: {fraction: [0.5\n")
    (t / "config-unknown.yaml").write_text("budgett: {fraction: 0.5}\n")
    (t / "config-type.yaml").write_text("deploy: {batch: many}\n")
    (t / "config-nan.yaml").write_text("optimizer: {rho: .nan}\n")
    (t / "config-section.yaml").write_text("deploy: 32\n")
    (t / "resume-empty").mkdir()
    (t / "resume-corrupt").mkdir()
    (t / "resume-corrupt" / "config.json").write_text('{"seed": ')
    (t / "emptydir").mkdir()
    fm = fashion_folder(t / "fm-truncated")
    g = fm / "train-images-idx3-ubyte.gz"
    g.write_bytes(g.read_bytes()[:200])
    fm = fashion_folder(t / "fm-labels", labels_max=13)
    fm = fashion_folder(t / "fm-magic")
    with gzip.open(fm / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + (60).to_bytes(4, "big") + bytes(60))
    fm = fashion_folder(t / "fm-not-gzip")
    (fm / "t10k-images-idx3-ubyte.gz").write_bytes(b"plain bytes")
    fm = fashion_folder(t / "fm-count")
    _idx(fm / "t10k-labels-idx1-ubyte.gz", np.zeros(7))
    for damage in ("truncated", "not a pickle", "wrong shape", "labels out of range", "labels missing"):
        cifar_folder(t / f"cifar-{damage.replace(' ', '-')}", damage)
    image_folder(t / "if-not-image", bad="not an image")
    image_folder(t / "if-truncated", bad="truncated")
    image_folder(t / "if-empty-class", empty_class=True)
    (t / "if-no-test" / "train" / "a").mkdir(parents=True)
    return w


# ---- the matrix ----------------------------------------------------------------------------------

def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def flags(command: str) -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in subparser(command)._actions if a.option_strings and a.dest != "help"}


# Out-of-range values of every numeric flag (a value of the right type that the setting cannot
# take), or why the flag takes any value of its type.
RANGE = {
    "--budget": "1.5", "--budget-ms": "0", "--calibration-images": "0", "--int8-min-top1": "1.01",
    "--deploy-batch": "0", "--opset": "6", "--max-accuracy-drop": "-0.1", "--max-corruption-drop": "2",
    "--threads": "0", "--round-to": "0", "--sensitivity-passes": "0", "--search": "-1", "--search-iters": "-1",
    "--param-ratio": "0", "--checkpoint-every": "-5", "--sharpness-rho": "-0.1", "--warmup-epochs": "-1",
    "--prune-steps": "0", "--prune-every": "0", "--correct-steps": "-1", "--rho": "-1", "--rho-min": "-0.5",
    "--rho-max": "-2", "--sam-every": "0", "--robust-images": "-1", "--pretrain-epochs": "-1",
    "--finetune-epochs": "-0.5", "--batch-size": "0", "--train-subset": "-1", "--test-subset": "-1",
    "--val-size": "-1", "--profile-step": "0", "--profile-round-s": "0", "--fit-configs": "-1",
    "--verify-rounds": "0", "--verify-round-s": "-1", "--calibrate-iters": "-1", "--plan-lines": "-1",
    "--calibrate-round-s": "0",
    "--validate": "-1", "--seed": "-1", "--input-size": "-1", "--num-classes": "-1", "--max-minutes": "0",
    # bench
    "--warmup": "-1", "--iterations": "1", "--batch": "0", "--block": "0", "--max-cv": "-0.1", "--max-ci": "0",
}
ANY_VALUE: dict[str, str] = {}

# Path and name flags: (case name, value, a fragment of the expected line). "{x}" names a world entry.
PATHS = {
    "--config": [("missing", "/nonexistent/c.yaml", "does not exist"), ("folder", "{emptydir}", "folder"),
                 ("not yaml", "{config-broken.yaml}", "not valid YAML"), ("not a mapping", "{config-list.yaml}",
                                                                           "mapping"),
                 ("binary", "{garbage}", "config file"), ("unknown key", "{config-unknown.yaml}", "unknown config key"),
                 ("wrong type", "{config-type.yaml}", "deploy.batch must be an integer"),
                 ("NaN", "{config-nan.yaml}", "optimizer.rho must be a finite number"),
                 ("section not a mapping", "{config-section.yaml}", "must be a mapping")],
    "--model": [("unknown", "resnet21", "unknown model"), ("empty", "", "unknown model"),
                ("no module", "no_such_module:f", "cannot import"), ("no factory", "{mod}:nothing", "cannot import"),
                ("factory raises", "{mod}:raises", "raised RuntimeError: weights file missing"),
                ("not a module", "{mod}:not_a_module", "not an nn.Module"),
                ("untraceable", "{mod}:shuffle", "torch-pruning cannot trace ShuffleNetV2")],
    "--weights": [("missing", "/nonexistent/w.pt", "does not exist"), ("folder", "{emptydir}", "folder"),
                  ("empty", "{empty}", "cannot load --weights"), ("garbage", "{garbage}", "cannot load --weights"),
                  ("truncated", "{weights-truncated.pt}", "cannot load --weights"),
                  ("wrong shape", "{weights-resnet56.pt}", "cannot load --weights"),
                  ("wrong type", "{weights-list.pt}", "cannot load --weights")],
    "--data": [("missing", "/nonexistent/data", "neither an existing path"), ("empty folder", "{emptydir}",
                                                                                 "not a dataset folder"),
               ("a file", "{text}", "not a folder"),
               ("fashion truncated", "{fm-truncated}", "truncated"), ("fashion labels", "{fm-labels}", "labels span"),
               ("fashion magic", "{fm-magic}", "not an IDX file"), ("fashion not gzip", "{fm-not-gzip}",
                                                                    "not a readable gzip"),
               ("fashion count", "{fm-count}", "labels"),
               ("cifar truncated", "{cifar-truncated}", "not a readable CIFAR python batch"),
               ("cifar not a pickle", "{cifar-not-a-pickle}", "not a readable CIFAR python batch"),
               ("cifar wrong shape", "{cifar-wrong-shape}", "expected pixel values 0-255"),
               ("cifar labels", "{cifar-labels-out-of-range}", "labels span"),
               ("cifar no labels", "{cifar-labels-missing}", "holds no 'labels'"),
               ("image not an image", "{if-not-image}", "notes.png is not a readable image"),
               ("image truncated", "{if-truncated}", "0.png is not a readable image"),
               ("class without images", "{if-empty-class}", "class 'b' has no images"),
               ("no test folder", "{if-no-test}", "not a dataset folder")],
    "--table": [("missing", "/nonexistent/table.json", "does not exist"), ("folder", "{emptydir}", "folder"),
                ("empty", "{empty}", "latency table"), ("truncated", "{table.json}", "latency table"),
                ("not json", "{garbage}", "latency table"), ("wrong type", "{table-list.json}", "latency table")],
    "--out": [("a file", "{text}", "is a file"), ("under a file", "{text}/run", "which is a file")],
    "--cache-dir": [("a file", "{text}", "is a file"), ("under a file", "{text}/cache", "which is a file")],
    "--resume": [("missing", "/nonexistent/run", "has no config.json"), ("no config", "{resume-empty}",
                                                                          "has no config.json"),
                 ("corrupt config", "{resume-corrupt}", "is corrupted")],
}
# bench's file flags: (case, args, fragment)
BENCH_FILES = {
    "--dense": [("missing", ["--dense", "/nonexistent/a.onnx", "--compact", "{garbage}"], "does not exist"),
                ("not onnx", ["--dense", "{garbage}", "--compact", "{garbage}"], "ONNX")],
    "--compact": [("folder", ["--dense", "{emptydir}", "--compact", "{emptydir}"], "folder"),
                  ("empty", ["--dense", "{empty}", "--compact", "{empty}"], "not an ONNX model")],
    "--json": [("under a file", ["{emptydir}", "--json", "{text}/r.json"], "which is a file"),
               ("a folder", ["{emptydir}", "--json", "{emptydir}"], "is a folder")],
}
BENCH_POSITIONAL = [("missing", ["/nonexistent/run"], "does not exist"), ("empty run dir", ["{emptydir}"], "no")]
# sweep's own flag
SWEEP = {"--budgets": [("not numbers", "a,b", "comma-separated"), ("out of range", "0.5,1.5", "(0, 1]"),
                       ("empty", "", "fractions"), ("NaN", "nan", "(0, 1]")]}


def _fill(value: str, w: dict) -> str:
    """``{name}``: the world's file or folder of that name (or its module name, its data folder)."""
    for name in [p.name for p in w["tmp"].iterdir()] + ["mod", "data"]:
        value = value.replace("{" + name + "}", str(w["tmp"] / name) if name not in ("mod", "data") else w[name])
    assert "{" not in value, value
    return value


def _cases() -> list[tuple[str, str, list[str], str | None]]:
    """(id, command, argv tail, fragment): the whole matrix, from the parsers."""
    out = []
    for command in ("run", "bench"):
        for flag, act in flags(command).items():
            if act.nargs == 0:  # a switch given a value
                out.append((f"{command} {flag} given a value", command, [f"{flag}=yes"], "ignored explicit argument"))
                continue
            out.append((f"{command} {flag} missing its value", command, [flag], "expected one argument"))
            if act.choices is not None:
                out.append((f"{command} {flag} not a choice", command, [flag, "nonsense"], "invalid choice"))
            elif act.type in (int, float):
                out.append((f"{command} {flag} wrong type", command, [flag, "abc"], "invalid"))
                out.append((f"{command} {flag} empty", command, [flag, ""], "invalid"))
                if act.type is float:
                    out.append((f"{command} {flag} NaN", command, [flag, "nan"], None))
                    out.append((f"{command} {flag} infinite", command, [flag, "inf"], None))
                else:
                    out.append((f"{command} {flag} a fraction", command, [flag, "1.5"], "invalid int"))
                if flag in RANGE:
                    out.append((f"{command} {flag} out of range", command, [flag, RANGE[flag]], None))
    for flag, cases in PATHS.items():
        for name, value, frag in cases:
            out.append((f"run {flag} {name}", "run", [flag, value], frag))
    for flag, cases in BENCH_FILES.items():
        for name, args, frag in cases:
            out.append((f"bench {flag} {name}", "bench", args, frag))
    for name, args, frag in BENCH_POSITIONAL:
        out.append((f"bench run_dir {name}", "bench", args, frag))
    for flag, cases in SWEEP.items():
        for name, value, frag in cases:
            out.append((f"sweep {flag} {name}", "sweep", [f"{flag}={value}"], frag))
    return out


CASES = _cases()


def test_every_flag_has_cases():
    """A new flag must get its cases: a numeric one an out-of-range value (or a reason it has none),
    a path or name flag its PATHS / BENCH_FILES entries."""
    missing = []
    for command in ("run", "bench", "sweep"):
        for flag, act in flags(command).items():
            if act.nargs == 0 or act.choices is not None:
                continue  # switches and choices: generic cases
            if act.type in (int, float):
                if flag not in RANGE and flag not in ANY_VALUE:
                    missing.append(f"{command} {flag}: add an out-of-range value to RANGE")
            elif flag not in PATHS and flag not in BENCH_FILES and flag not in SWEEP:
                missing.append(f"{command} {flag}: add its cases to PATHS / BENCH_FILES")
    assert not missing, missing


def _config_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        default = getattr(RunConfig(), f.name)
        if dataclasses.is_dataclass(default):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(default)]
        else:
            keys.append(f.name)
    return keys


def _wrong_value(hint) -> object:
    """A value of the wrong type for a field annotated ``hint`` (None where any value is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _wrong_value(args[0]) if len(args) == 1 else None
    return {bool: "yes", int: "three", float: "fast", str: 12}.get(hint, None)


def test_every_config_key_has_a_case():
    """Every key of every config section, given a value of the wrong type (and NaN for numbers) in a
    config file, is refused by name before anything is written."""
    unchecked = []
    for key in _config_keys():
        section, _, name = key.partition(".")
        default = getattr(RunConfig(), section)
        cls = type(default) if name else RunConfig
        hint = typing.get_type_hints(cls)[name or section]
        bad = _wrong_value(hint)
        if bad is None:
            unchecked.append(key)
            continue
        d = {section: {name: bad}} if name else {section: bad}
        with pytest.raises(Exception) as e:
            RunConfig.from_dict(d)
        assert type(e.value).__name__ == "BadInput" and key in str(e.value), (key, e.value)
        if bad in ("three", "fast"):
            with pytest.raises(Exception) as e:
                RunConfig.from_dict({section: {name: float("nan")}} if name else {section: float("nan")})
            assert type(e.value).__name__ == "BadInput", (key, e.value)
    assert not unchecked, f"keys of a type check_type does not know: give them a case here: {unchecked}"


def _error_lines(err: str) -> list[str]:
    """stderr less log records (HH:MM:SS LEVEL name: ...) and warnings lines."""
    return [ln for ln in err.splitlines() if ln.strip() and not (len(ln) > 9 and ln[2] == ":" and ln[5] == ":")]


class Accepted(Exception):
    """Raised where a run would start measuring: the input got past every check."""


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case, world, tmp_path, capsys, monkeypatch):
    name, command, tail, fragment = case

    def accepted(*a, **k):
        raise Accepted(f"{name}: accepted, the run reached profiling")

    monkeypatch.setattr(run_module, "profile_stage", accepted)  # a case that is not refused fails in a second
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache.mkdir()
    tail = [_fill(v, world) for v in tail]
    given = {t.split("=")[0] for t in tail if t.startswith("--")}
    if command == "bench":
        argv = ["bench", *tail] + ([] if "--json" in given else ["--json", str(out / "bench.json")])
    elif "--resume" in given:
        argv = [command, *tail]  # --resume takes every setting from the run directory
    else:
        argv = [command, "--no-progress", "--data", world["data"], "--val-size", "10", "--robust-images", "0",
                "--out", str(out), "--cache-dir", str(cache)]
        if not given & {"--budget-ms", "--target", "--param-ratio"}:
            argv += ["--budget", "0.5"]
        if "--param-ratio" in given:
            argv += ["--target", "params"]
        argv += tail  # after the defaults: argparse keeps the last value of a flag
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith(FRAGMENT), lines
    if fragment:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists(), "no run directory left behind"
    assert not any(cache.iterdir()), "no cache entry left behind"


@pytest.mark.parametrize("argv,code", [
    (["run", "--budget", "abc"], 2),
    (["run", "--data", "/nonexistent/data"], 2),
    (["bench", "/nonexistent/run"], 2),
])
def test_exit_codes_as_a_shell_sees_them(argv, code, tmp_path):
    p = subprocess.run([sys.executable, "-m", "latprune.cli", *argv, "--out" if argv[0] == "run" else "--json",
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr and len(_error_lines(p.stderr)) == 1, p.stderr


# ---- the Python API: LatencyPruner's every parameter ----------------------------------------------

def _api_cases(tmp: Path) -> dict[str, list]:
    """LatencyPruner(**{param: value}) for each bad value, on a tiny model and a known table."""
    return {
        "model": [42, "resnet20"],
        "example_inputs": ["x", torch.zeros(3, 16, 16), torch.zeros(0, 3, 16, 16)],
        "budget": [float("nan"), 0, 1.5, "0.5", True, float("inf")],
        "table": [str(tmp / "missing.json"), str(tmp), 42],
        "runtime": ["nope", 42],
        "threads": [0, "two"],
        "precision": ["int4"],
        "ignored_layers": [["nope"], [42], "stem"],
        "steps": [0, float("nan"), "3"],
        "every": [0, -1],
        "importance": ["nope", 3],
        "round_to": [0, -8, 2.5],
        "profile": ["fast"],
        "timing": ["fast"],
        "window": [(0.9, 0.5), (float("nan"), 1.0), (0.5,), "wide"],
        "target_ms": [-1.0, float("nan"), 0],
        "min_widths": [{"nope": 8}, {"stem.0": -1}, [8]],
        "scoring_batches": [42],
        "held_out": [42],
        "plan_config": ["halp"],
        "store": [42, 3.5],
    }


API_ANY = {"floor": "any value is read as a bool (floor=bool(floor))"}


def test_every_api_parameter_has_cases(tmp_path):
    params = set(inspect.signature(LatencyPruner.__init__).parameters) - {"self"}
    assert params == set(_api_cases(tmp_path)) | set(API_ANY), params ^ (set(_api_cases(tmp_path)) | set(API_ANY))


def _api_matrix():
    return [(p, i) for p, vals in _api_cases(Path("/")).items() for i in range(len(vals))]


@pytest.mark.parametrize("param,i", _api_matrix(), ids=[f"{p}-{i}" for p, i in _api_matrix()])
def test_api_bad_input(param, i, tmp_path):
    model = residual_net()
    value = _api_cases(tmp_path)[param][i]
    kwargs = {"table": fake_table(model, (3, 16, 16)), "runtime": None, "importance": "magnitude"}
    if param == "runtime" or param == "threads":
        kwargs["runtime"] = "ort"
    if param in ("scoring_batches", "held_out"):
        kwargs["importance"] = "sensitivity"
    kwargs[param] = value
    args = {"model": model, "example_inputs": torch.zeros(1, 3, 16, 16), "budget": 0.5}
    for k in list(args):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(BadInput) as e:
        LatencyPruner(args["model"], args["example_inputs"], args["budget"], **kwargs)
    assert "\n" not in str(e.value)
