"""Does graph simplification (onnxslim) make the exported files faster on the deployment runtime?

    pip install onnxslim   # benchmark-only; not a latprune dependency
    python benchmarks/simplify.py RUN_DIR [--batch 32] [--iterations 400] [--json OUT]

For dense.onnx and model.onnx of a finished run: the file as latprune exports it against the
same file through ``onnxslim.slim``, timed interleaved with ``latprune bench``'s machinery (ONNX
Runtime CPU, ORT_ENABLE_ALL). Prints node counts, sizes, p50s and the speedup of the slimmed file
with its bootstrap interval; writes JSON. latprune adopts simplification only if this shows a gain.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from latprune.export.bench import BenchConfig, backend_programs, bench
from latprune.export.onnx_export import onnx_batch, read_contract
from latprune.latency_tables.device import environment


def main() -> None:
    import onnxslim

    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    run = Path(a.run_dir)
    rows = []
    for name in ("dense.onnx", "model.onnx"):
        src = run / name
        slim = onnxslim.slim(onnx.load(str(src)))
        slim_bytes = slim.SerializeToString()
        batch = onnx_batch(src) or 1
        shape = tuple(read_contract(src)["input_shape"])
        cfg = BenchConfig(iterations=a.iterations, allow_noisy=True)
        progs, info = backend_programs(src, slim_bytes, shape, cfg, batch)  # "dense" = as exported, "compact" = slimmed
        m = bench(progs, batch, cfg)["latency"]
        rows.append({"file": name, "batch": batch, "nodes": len(onnx.load(str(src)).graph.node),
                     "nodes_slim": len(slim.graph.node), "bytes": src.stat().st_size, "bytes_slim": len(slim_bytes),
                     "p50_ms": m["dense"]["p50_ms"], "p50_ms_slim": m["compact"]["p50_ms"],
                     "speedup_of_slim": m["speedup"], "ci95": m["speedup_ci95"], "noisy": m["noisy"]})
    print(f"{'file':<11} {'batch':>5} {'nodes':>11} {'p50 ms':>17} {'slim speedup':>13} {'95% CI':>13}")
    for r in rows:
        print(f"{r['file']:<11} {r['batch']:>5} {r['nodes']:>5}->{r['nodes_slim']:<5} "
              f"{r['p50_ms']:>8.3f}->{r['p50_ms_slim']:<8.3f}"
              f" {r['speedup_of_slim']:>12.3f}x {r['ci95'][0]:>6.3f}-{r['ci95'][1]:<6.3f}")
    out = Path(a.json or run / "simplify_benchmark.json")
    out.write_text(json.dumps({"run": str(run), "onnxslim": onnxslim.__version__, "rows": rows,
                               "environment": environment()}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
