"""What ``--sam-every K`` costs: the step-time ratio of ASAM and AdaSAP to SGD at K = 1, 2, 4.

    python benchmarks/sam_every.py [--model resnet20] [--ks 1 2 4] [--repeats 5] [--out runs/bench-sam-every.json]

On the dense model (the bundled ResNet-20 by default) and the training batches a run uses, each
method's step rule (``pipeline.schedule.step_time_ratio``: the rule and plain SGD interleaved on the
same batches, whole periods of the K-step alternation, copies of the model) is timed ``--repeats``
times; the median and the range are printed and written with the machine's description. Expect
about 2.0, 1.5 and 1.25 x SGD (two passes on 1 of K steps).
"""
from __future__ import annotations

import argparse
from datetime import datetime, timezone

import numpy as np

from latprune.io import write_json_atomic
from latprune.latency_tables.device import environment
from latprune.pipeline.adasap import OptimizerConfig
from latprune.pipeline.config import RunConfig
from latprune.pipeline.schedule import step_time_ratio
from latprune.pipeline.stages import dense_stage, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--weights", default=None)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench-sam-every.json")
    a = p.parse_args()
    cfg = RunConfig().with_overrides(model=a.model, weights=a.weights, out="runs/bench-sam-every-base", progress=False)
    inp, rd = prepare(cfg)
    model = dense_stage(inp, rd).model
    rows = []
    for method in ("asam", "adasap"):
        for k in a.ks:
            opt = OptimizerConfig(method=method, sam_every=k)
            r = [step_time_ratio(model, inp.data, opt, cfg.finetune, inp.input_shape, steps=12)
                 for _ in range(a.repeats)]
            rows.append({"method": method, "sam_every": k, "median": float(np.median(r)), "ratios": r})
            print(f"{method} K={k}: {np.median(r):.2f} x SGD (range {min(r):.2f}-{max(r):.2f}, {a.repeats} repeats)",
                  flush=True)
    write_json_atomic(a.out, {"rows": rows, "model": a.model, "batch": cfg.finetune.batch_size,
                              "environment": environment(),
                              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


if __name__ == "__main__":
    main()
