"""How stable is a dense/compact latency ratio over a minute or two on this machine?

    python benchmarks/drift.py RUN_DIR [--repeats 6] [--threads 2] [--json OUT]

Times the run's dense.onnx and model.onnx interleaved (7 rounds x 0.25 s), again and again, with
ORT's spin-waiting off (what latprune measures with) and on, alternately, in fresh sessions.
Prints one row per measurement and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from latprune.latency_tables.device import environment
from latprune.latency_tables.timing import time_interleaved


def _runner(path: Path, threads: int, spin: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(inp.shape, dtype=np.float32)
    return lambda: s.run(None, {inp.name: x})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    run = Path(a.run_dir)
    rows = []
    print(f"{'rep':>3} {'spin':>4} {'dense ms':>9} {'compact ms':>10} {'ratio':>6}")
    for i in range(a.repeats):
        for spin in ("0", "1"):
            fns = [_runner(run / "dense.onnx", a.threads, spin), _runner(run / "model.onnx", a.threads, spin)]
            td, tc = time_interleaved(fns, rounds=7, min_round_s=0.25)
            rows.append({"repeat": i, "spin": spin == "1", "dense_ms": td.median_ms, "compact_ms": tc.median_ms,
                         "ratio": tc.median_ms / td.median_ms})
            print(f"{i:>3} {spin:>4} {td.median_ms:>9.3f} {tc.median_ms:>10.3f} {rows[-1]['ratio']:>6.3f}", flush=True)
            del fns
            gc.collect()
    for spin in (False, True):
        r = np.array([x["ratio"] for x in rows if x["spin"] == spin])
        print(f"spin={'on' if spin else 'off'}: ratio min {r.min():.3f} max {r.max():.3f} "
              f"(spread {r.max() / r.min() - 1:.0%})")
    out = Path(a.json or run / "drift.json")
    out.write_text(json.dumps({"rows": rows, "environment": environment()}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
