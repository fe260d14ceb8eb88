"""End-to-end tests of the CLI on the embedded default (Fashion-MNIST + ResNet-20), miniature size."""
import json
import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import latprune
from latprune.cli import main
from latprune.latency_tables.runtimes.quantize import is_quantized
from latprune.pipeline.data import DEBIAN_FMNIST

needs_fmnist = pytest.mark.skipif(
    not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist (make test does it)",
)

MINI = ["--no-progress", "--train-subset", "512", "--val-size", "256", "--test-subset", "256",
        "--pretrain-epochs", "0.5", "--finetune-epochs", "0.25", "--batch-size", "64",
        "--deploy-batch", "32", "--profile-step", "16", "--profile-round-s", "0.004",
        "--verify-rounds", "3", "--verify-round-s", "0.1", "--calibrate-iters", "2", "--calibrate-round-s", "0.05",
        "--fit-configs", "2",
        "--warmup-epochs", "0.25", "--prune-steps", "2", "--prune-every", "3", "--robust-images", "8",
        "--search", "0"]  # the plan search is exercised by mini_run alone (SEARCHED)
# mini_run's flags: every test that continues mini_run's directory passes the same plan settings
SEARCHED = [*MINI, "--search", "3", "--search-iters", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "mini"
    code = main(["run", *SEARCHED, "--budget", "0.8", "--cache-dir", cache, "--out", str(out)])
    return code, out


@pytest.mark.slow
@needs_fmnist
def test_run_writes_a_complete_report(mini_run, capsys):
    code, out = mini_run
    assert code in (0, 4)  # 4: the report is written and says the budget was missed
    r = json.loads((out / "report.json").read_text())
    assert r["schema_version"] == 6
    assert r["budget"]["met"] == (code == 0)
    assert r["budget"]["target_ms"] == pytest.approx(0.8 * r["dense"]["latency_ms"])
    assert r["speedup"] == pytest.approx(r["dense"]["latency_ms"] / r["compact"]["latency_ms"])
    assert r["runtime"]["name"] == "onnxruntime" and r["runtime"]["provider"] == "CPUExecutionProvider"
    assert r["runtime"]["input_shape"] == [32, 3, 32, 32] and r["runtime"]["threads"] == 2
    for k in ("dense", "compact"):
        assert 0 <= r[k]["accuracy"] <= 1 and r[k]["latency_ms"] > 0 and r[k]["params"] > 0 and r[k]["macs"] > 0
    assert r["compact"]["params"] < r["dense"]["params"] and r["compact"]["macs"] < r["dense"]["macs"]
    assert r["parity"]["top1_agreement"] >= 0.99
    assert r["plan"]["calibration"], "the planned widths were timed before training"
    search = r["plan"]["search"]  # the plan search, end to end: timed candidates, one chosen
    assert search["cost"]["candidates"] >= 2 and sum(bool(c.get("chosen")) for c in search["candidates"]) == 1
    assert all(c["measured_ratios"] for c in search["candidates"])
    assert r["training"]["searched"] and not r["training"]["emerging"]
    assert "## Plan search" in (out / "report.md").read_text()
    for h in r["plan"]["calibration"]:
        assert h["measured_ratio"] > 0 and h["pair_ratios"] and h["e2e"]["slope"] > 0
    assert r["table"]["e2e"]["points"] == 4  # dense, smallest, 2 random (--fit-configs 2)
    assert len(r["verify"]["pair_ratios"]) >= 3
    rob = r["robustness"]
    assert rob["eval_images"] == 8 and len(rob["per_corruption"]) == 15
    assert rob["R_C"] == (pytest.approx(rob["corruption_acc"] / rob["clean_acc"]) if rob["clean_acc"] else 0.0)
    assert rob["corruption_acc"] == pytest.approx(np.mean(list(rob["per_corruption"].values())))
    t = r["training"]
    assert t["method"] == "adasap" and t["step_time_ratio"] > 0
    assert [h["step"] for h in t["prune_history"]] == [1, 2]
    assert t["prune_history"][0]["params"] > t["prune_history"][1]["params"]  # the target shrinks
    assert t["target"] == "latency" and r["budget"]["target"] == "latency"
    assert t["sharpness"]["pre_pruning"] >= 0 and t["sharpness"]["post_pruning"] >= 0
    assert not (out / "training.ckpt.pt").exists()  # the training checkpoint goes once training ends
    assert sum(r["compact"]["channels"].values()) < sum(r["dense"]["channels"].values())
    assert [g["name"] for g in r["gates"]] == ["parity", "onnx_shrink", "latency"]
    assert all(g["ok"] for g in r["gates"][:2]) and r["gates"][2]["ok"] == r["budget"]["met"]
    p = r["parity"]
    assert p["ok"] and p["images"] == 256 and p["batches"] == 8 and p["outputs"][0]["name"] == "logits"
    o = r["onnx"]
    assert o["compact"]["opset"] == 17 and not o["compact"]["dynamic_batch"] and o["shrink"]["ratio"] < 1
    assert o["contract"]["classes"][0] == "T-shirt/top" and o["contract"]["mean"]
    assert (len(r["layer_latency"]) == len(json.loads((out / "table.json").read_text())["layer_keys"])
            and all(x["measured_ms"] > 0 for x in r["layer_latency"]))
    w = r["why_not_faster"]
    # at most equal: a compact model already at every group's floor predicts its own floor (to rounding)
    assert 0 < w["untouchable"]["floor_ms"] <= 1.001 * w["untouchable"]["predicted_ms"]
    assert w["hardware_multiple"] in (4, 8, 16)
    assert w["providers"]["fallback_nodes"] == 0 and w["providers"]["per_provider"]["CPUExecutionProvider"] > 10
    md = (out / "report.md").read_text()
    assert "## Why is it not faster?" in md and "## Deployment gates" in md and "| logits |" in md
    for f in ("table_staircases.png", "config.json", "table.json", "plan.json", "arch.json",
              "model.pt", "model.onnx", "dense.onnx",
              "report.md", "environment.json", "channels.png", "layer_latency.png", "dense.pt"):
        assert (out / f).exists(), f
    assert (out / "model.onnx").stat().st_size < (out / "dense.onnx").stat().st_size
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
@needs_fmnist
def test_profile_validate_stores_the_prediction_error(tmp_path, capsys):
    out, fresh = tmp_path / "prof", tmp_path / "cache"
    assert main(["profile", *MINI, "--validate", "2", "--cache-dir", str(fresh), "--out", str(out)]) == 0
    assert not list(fresh.glob("checkpoints/*.pt")), "profiling needs no trained weights"
    v = json.loads((out / "table.json").read_text())["meta"]["validation"]
    assert v["k"] == 2 and len(v["points"]) == 2 and v["p90_rel_err"] >= v["median_rel_err"] >= 0
    assert all(p["predicted_ms"] > 0 and p["measured_ms"] > 0 for p in v["points"])
    assert (out / "table_validation.png").exists() and (out / "table_staircases.png").exists()
    assert "prediction error on 2 random pruned configurations" in capsys.readouterr().err


@pytest.mark.slow
@needs_fmnist
def test_reloaded_compact_model_matches_its_onnx(mini_run):
    _, out = mini_run
    model = latprune.load(out)
    x = torch.randn(32, 3, 32, 32)  # the static deployment batch
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_fmnist
def test_same_out_resumes_without_redoing_stages(mini_run, cache, tmp_path, capsys):
    _, out = mini_run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    plan_before = (copy / "plan.json").read_text()
    weights_mtime = (copy / "model.pt").stat().st_mtime_ns
    code = main(["export", *SEARCHED, "--budget", "0.8", "--cache-dir", cache, "--out", str(copy)])
    assert code in (0, 4)
    assert (copy / "plan.json").read_text() == plan_before
    assert (copy / "model.pt").stat().st_mtime_ns == weights_mtime  # not fine-tuned again
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(copy / "report.json")


@pytest.mark.slow
@needs_fmnist
def test_another_seed_reuses_the_budgets_plan(mini_run, cache, tmp_path, capsys):
    """The plan depends on the dense model and the budget, not on the training seed: a benchmark
    trains every seed from one timed plan (with the bundled weights, as with --weights)."""
    _, out = mini_run
    assert json.loads((out / "report.json").read_text())["dense"]["pretrain"]["source"] == "bundled"
    copy = tmp_path / "seed1"
    shutil.copytree(out, copy)
    plan_mtime = (copy / "plan.json").stat().st_mtime_ns
    assert main(["plan", *SEARCHED, "--budget", "0.8", "--seed", "1", "--cache-dir", cache, "--out", str(copy)]) == 0
    assert (copy / "plan.json").stat().st_mtime_ns == plan_mtime  # reused, not searched and timed again


@pytest.mark.slow
@needs_fmnist
def test_resume_flag_continues_a_run_with_its_own_config(mini_run, tmp_path, capsys):
    _, out = mini_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    (copy / "report.json").unlink()
    weights_mtime = (copy / "model.pt").stat().st_mtime_ns
    code = main(["run", "--resume", str(copy), "--no-progress"])
    assert code in (0, 4)
    assert (copy / "model.pt").stat().st_mtime_ns == weights_mtime  # training was done: not redone
    r = json.loads((copy / "report.json").read_text())
    assert r["runtime"]["input_shape"] == [32, 3, 32, 32]  # the run's own settings, not the defaults
    _, err = capsys.readouterr()
    code = main(["run", "--resume", str(copy), "--seed", "3"])
    assert code == 2 and "drop --seed" in capsys.readouterr().err
    code = main(["run", "--resume", str(tmp_path / "nothing")])
    assert code == 2 and "has no config.json" in capsys.readouterr().err


@pytest.mark.slow
@needs_fmnist
def test_parameter_target_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "params"
    code = main(["run", *MINI, "--target", "params", "--param-ratio", "0.5", "--importance", "magnitude",
                 "--cache-dir", cache, "--out", str(out)])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    b = r["budget"]
    assert b["target"] == "params" and b["target_ms"] is None and b["met"]
    assert b["achieved_param_ratio"] == pytest.approx(r["compact"]["params"] / r["dense"]["params"])
    assert b["achieved_param_ratio"] <= 0.5
    assert r["plan"]["calibration"] == [] and r["training"]["target"] == "params"
    assert "Parameter target **met**" in (out / "report.md").read_text()


@pytest.mark.slow
@needs_fmnist
def test_stage_subcommands_stop_after_their_stage(mini_run, cache, tmp_path, capsys):
    out = tmp_path / "stages"
    assert main(["plan", *MINI, "--budget", "0.8", "--cache-dir", cache, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "plan.json")
    assert not (out / "arch.json").exists()
    assert main(["prune", *MINI, "--budget", "0.8", "--cache-dir", cache, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "arch.json")
    assert latprune.load(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()


@pytest.mark.slow
@needs_fmnist
def test_torch_runtime_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "torch"
    # torch eager times ~3x noisier than ORT: at MINI's 4 ms rounds one bad entry once put the
    # table's floor above the dense latency (exit 2); longer rounds for this table (issue 4 owns
    # re-measuring noisy entries). One thread: with two, a machine shared with other processes
    # stalls torch's OpenMP barriers for whole scheduler slices (entries of 35-47 ms where the layer
    # takes 0.3 ms, measured on 2026-12-03 while another job ran), which again raised the floor above dense
    code = main(["run", *MINI, "--runtime", "torch", "--threads", "1", "--profile-round-s", "0.02",
                 "--budget", "0.9", "--cache-dir", cache, "--out", str(out)])
    assert code in (0, 4)
    r = json.loads((out / "report.json").read_text())
    assert r["runtime"]["name"] == "torch" and r["runtime"]["provider"] == "cpu"
    assert json.loads((out / "table.json").read_text())["header"]["runtime"] == "torch"
    assert r["budget"]["met"] == (r["compact"]["latency_ms"] <= r["budget"]["target_ms"])


def _bad(args, tmp_path, capsys, cache, match):
    out = tmp_path / "bad"
    code = main([*args, "--cache-dir", cache, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("latprune: error: ") and match in err[-1]
    assert not out.exists(), "no partial run directory"


@needs_fmnist
@pytest.mark.parametrize("args,match", [
    (["run", "--budget", "1.7"], "budget must be in (0, 1]"),
    (["run", "--budget-ms", "-3"], "--budget-ms must be a positive"),
    (["run", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["run", "--rho-min", "3", "--rho-max", "1"], "rho_min (3.0) > rho_max (1.0)"),
    (["run", "--rho", "-1"], "non-negative"),
    (["run", "--data", "/nonexistent/folder"], "neither an existing path"),
    (["run", "--target", "params", "--budget", "0.5", "--param-ratio", "0.4"], "drop --budget"),
    (["run", "--param-ratio", "0.4"], "add --target params"),
    (["run", "--target", "params"], "needs --param-ratio"),
    (["run", "--precision", "int8", "--fp16"], "--fp16 and --precision int8 disagree"),
    (["run", "--precision", "int8", "--runtime", "torch"], "--precision int8 is not available on runtime torch"),
    (["run", "--precision", "int8", "--calibration-images", "8"], "less than one deployment batch"),
    (["run", "--int8-min-top1", "1.5"], "--int8-min-top1 in (0, 1]"),
])
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path, capsys, cache):
    _bad(args, tmp_path, capsys, cache, match)


@needs_fmnist
def test_corrupted_and_mismatched_tables_are_refused(tmp_path, capsys, cache):
    from latprune.models.registry import ModelSpec
    from latprune.testing import fake_table

    t = fake_table(ModelSpec("resnet20").build())
    t.save(tmp_path / "fake.json")
    _bad(["run", "--table", str(tmp_path / "fake.json")], tmp_path, capsys, cache, "measured for another setting")
    (tmp_path / "broken.json").write_text((tmp_path / "fake.json").read_text()[:500])
    _bad(["run", "--table", str(tmp_path / "broken.json")], tmp_path, capsys, cache, "truncated or corrupted")


@pytest.mark.slow
@needs_fmnist
def test_unreachable_budget_leaves_no_run_dir(tmp_path, capsys, cache, mini_run):
    _bad(["run", *MINI, "--budget", "0.01"], tmp_path, capsys, cache, "smallest reachable latency")


@pytest.mark.slow
@needs_fmnist
def test_failed_gates_still_write_the_report_and_exit_nonzero(mini_run, cache, tmp_path, capsys):
    _, out = mini_run
    r = json.loads((out / "report.json").read_text())
    drop = r["dense"]["accuracy"] - r["compact"]["accuracy"]
    corrupted_drop = r["robustness"]["dense"]["corruption_acc"] - r["robustness"]["corruption_acc"]
    copy = tmp_path / "gated"
    shutil.copytree(out, copy)
    (copy / "report.json").unlink()
    # a limit below the observed drop fails (a negative limit is refused, so a run whose compact model
    # gained accuracy gets a limit it passes, and the corruption gate is the one that fails)
    limit = max(drop - 0.01, 0.0) if drop > 0 else 0.5
    corr_limit = 0.5 if drop > 0 else 0.0
    code = main(["export", *SEARCHED, "--budget", "0.8", "--cache-dir", cache, "--out", str(copy),
                 "--max-accuracy-drop", str(limit), "--max-corruption-drop", str(corr_limit)])
    g = {x["name"]: x for x in json.loads((copy / "report.json").read_text())["gates"]}
    assert g["accuracy"]["ok"] == (drop <= limit) and g["corruption_accuracy"]["ok"] == (corrupted_drop <= corr_limit)
    failed = [n for n, x in g.items() if not x["ok"]]
    err = capsys.readouterr().err
    if failed:
        assert code == {"latency": 4, "accuracy": 5, "corruption_accuracy": 5}[failed[0]]
        assert f"gate '{failed[-1]}' FAILED" in err
        assert "**FAIL**" in (copy / "report.md").read_text()
    else:  # neither model lost accuracy on any measure: nothing this test can make fail
        assert code == 0
    _bad(["run", *MINI, "--max-corruption-drop", "0.1", "--robust-images", "0"], tmp_path, capsys, cache,
         "needs the corruption evaluation")
    _bad(["run", *MINI, "--max-accuracy-drop", "-0.1"], tmp_path, capsys, cache, "fraction of accuracy in [0, 1]")


@pytest.mark.slow
@needs_fmnist
def test_dynamic_batch_export_and_bench_on_the_run(mini_run, cache, tmp_path, capsys):
    _, out = mini_run
    copy = tmp_path / "dyn"
    shutil.copytree(out, copy)
    code = main(["export", *SEARCHED, "--budget", "0.8", "--cache-dir", cache, "--out", str(copy), "--dynamic-batch"])
    assert code in (0, 4)
    r = json.loads((copy / "report.json").read_text())
    assert r["onnx"]["compact"]["dynamic_batch"] and r["parity"]["batches"] == 9  # 8 full batches + 1 image
    sess = ort.InferenceSession(str(copy / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], latprune.load(copy)(x).numpy(),
                                   atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert main(["bench", str(copy), "--batch", "1", "--iterations", "40", "--block", "10", "--warmup", "20",
                 "--allow-noisy"]) == 0
    b = json.loads((copy / "bench-ort-b1.json").read_text())
    assert b["input_shape"] == [1, 3, 32, 32] and b["models"]["source"] == "onnx files"  # dynamic files run at 1
    assert "speedup" in capsys.readouterr().err


@pytest.mark.slow
@needs_fmnist
def test_int8_run_end_to_end(tmp_path, cache, capsys):
    """--precision int8: an int8 table, a budget of the dense int8 latency, the QDQ files with their
    calibration in the metadata, top-1 parity, the gates on the int8 file, the four latencies."""
    out = tmp_path / "int8"
    # the miniature compact model is barely trained (near-tied logits flip under quantization: top-1
    # agreement 0.973 was seen), so the parity gate is set at 0.9 here; its failure is tested in
    # tests/export (exit 3)
    code = main(["run", *MINI, "--precision", "int8", "--calibration-images", "64", "--budget", "0.9",
                 "--int8-min-top1", "0.9", "--max-accuracy-drop", "1.0", "--cache-dir", cache, "--out", str(out)])
    assert code in (0, 4)
    r = json.loads((out / "report.json").read_text())
    header = json.loads((out / "table.json").read_text())["header"]
    assert r["runtime"]["dtype"] == header["dtype"] == "int8-u8s8"
    q = r["int8"]
    for k, name in (("dense", "dense.int8.onnx"), ("compact", "model.int8.onnx")):
        model = onnx.load(str(out / name))
        assert is_quantized(model) and q[k]["file"] == name and 0 <= q[k]["accuracy"] <= 1
        meta = json.loads({p.key: p.value for p in model.metadata_props}["latprune.int8"])
        assert meta["method"] == "minmax" and meta["calibration_images"] == 64 and meta["activations"] == "uint8"
        assert "latprune.preprocessing" in {p.key for p in model.metadata_props}
        assert q[k]["robustness"]["eval_images"] == 8
    assert q["parity"]["min_top1"] == 0.9 and q["parity"]["ok"] and q["parity"]["top1_agreement"] >= 0.9
    lat = q["latencies"]
    assert list(lat) == ["dense_fp32", "dense_int8", "compact_fp32", "compact_int8"] and lat["dense_fp32"]["ratio"] == 1
    assert all(v["ms"] > 0 for v in lat.values())
    assert r["budget"]["target_ms"] == pytest.approx(0.9 * r["dense"]["latency_ms"])  # of the dense int8 file
    gates = {g["name"]: g for g in r["gates"]}
    assert "int8_parity" in gates and gates["accuracy"]["value"] == pytest.approx(
        r["dense"]["accuracy"] - q["compact"]["accuracy"])
    assert (out / "precision_latency.png").exists() and "## Int8" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["bench", str(out), "--precision", "int8", "--iterations", "20", "--block", "10", "--warmup", "20",
                 "--allow-noisy"]) == 0
    b = json.loads((out / "bench-ort-b32-int8.json").read_text())
    assert b["models"]["compact"].endswith("model.int8.onnx") and b["config"]["precision"] == "int8"


@pytest.mark.slow
@needs_fmnist
def test_a_broken_export_fails_the_run_after_writing_the_report(tmp_path, cache, capsys):
    out = tmp_path / "broken"
    # budget 1.0: this tiny model's reachable floor is 0.85-0.92 of dense depending on the machine's
    # timing regime (0.9 was once refused before training, exit 2); the test is about parity
    code = main(["run", *MINI, "--model", "latprune.testing:broken_export_net", "--budget", "1.0",
                 "--robust-images", "0", "--cache-dir", cache, "--out", str(out)])
    assert code == 3
    r = json.loads((out / "report.json").read_text())
    assert r["parity"]["failed_output"] == "logits" and not r["gates"][0]["ok"]
    assert r["parity"]["max_abs_diff"] == pytest.approx(0.5, abs=1e-3)
    assert "gate 'parity' FAILED" in capsys.readouterr().err
    assert "| logits |" in (out / "report.md").read_text() and "**diverged**" in (out / "report.md").read_text()


@pytest.mark.slow
@needs_fmnist
def test_sweep_records_the_floor_and_draws_the_front(mini_run, cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", *MINI, "--budgets", "0.9,0.01", "--robust-images", "8", "--cache-dir", cache,
                 "--out", str(out)])
    s = json.loads((out / "sweep.json").read_text())
    assert s["budgets"] == [0.01, 0.9]
    low, high = s["points"]
    assert low["status"] == "below floor" and 0 < low["floor_ratio"] < 1 and "raise --budget" in low["detail"]
    assert not (out / "budget-0.01").exists()
    assert high["latency_ratio"] == pytest.approx(high["latency_ms"] / high["dense_latency_ms"])
    assert code == (0 if high["status"] == "ok" else 4)
    assert (out / "budget-0.90" / "report.json").exists() and (out / "sweep.png").stat().st_size > 10_000
    assert "below floor" in (out / "sweep.md").read_text()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "sweep.json")


def test_profile_without_data_at_the_deployment_input_size(tmp_path, capsys):
    """`latprune profile --input-size S` builds the table for a 3 x S x S input without reading any
    data (the --data path does not even exist), with --num-classes outputs; training commands refuse
    --input-size before writing anything."""
    out = tmp_path / "p"
    code = main(["profile", "--model", "latprune.testing:residual_net", "--input-size", "24", "--num-classes", "7",
                 "--data", "/nonexistent/images", "--deploy-batch", "1", "--profile-step", "16",
                 "--profile-round-s", "0.002", "--fit-configs", "1", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    t = json.loads((out / "table.json").read_text())
    assert t["header"]["input_shape"] == [3, 24, 24] and t["header"]["batch"] == 1
    assert json.loads((out / "config.json").read_text())["data"]["input_size"] == 24
    assert t["layer_keys"]["fc"].startswith("linear:32x7:") and "in24x24" in t["layer_keys"]["stem.0"]
    capsys.readouterr()
    code = main(["run", "--input-size", "24", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "applies to `latprune profile` alone" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_adaptive_profile_fills_the_store_and_a_second_model_reuses_it(tmp_path, capsys, caplog):
    """`latprune profile --sampling adaptive` on ONNX Runtime: the table, the store in the cache dir,
    and a model sharing every conv shape (another classifier) measures only its new layer."""
    cache = tmp_path / "cache"

    def profile(classes, out):
        return main(["profile", "--model", "latprune.testing:residual_net", "--input-size", "24", "--num-classes",
                     str(classes), "--deploy-batch", "1", "--profile-step", "8", "--profile-round-s", "0.002",
                     "--fit-configs", "1", "--sampling", "adaptive", "--max-minutes", "5", "--no-progress",
                     "--cache-dir", str(cache), "--out", str(tmp_path / out)])

    with caplog.at_level(logging.INFO, logger="latprune.latency_tables.profile"):
        assert profile(7, "a") == 0, capsys.readouterr().err
        first = json.loads((tmp_path / "a" / "table.json").read_text())["meta"]
        assert first["sampling"]["stopped"] in ("agreed", "budget") and first["from_store"] == 0
        assert profile(5, "b") == 0, capsys.readouterr().err
    second = json.loads((tmp_path / "b" / "table.json").read_text())["meta"]
    assert second["from_store"] > 0 and second["measured"] < first["measured"]
    assert "taken from the latency store" in caplog.text
    capsys.readouterr()
    assert main(["tables", "list", "--cache-dir", str(cache)]) == 0
    assert "(this machine), ort" in capsys.readouterr().out
