"""AdaSAP's radius pilot (issue 12, item 4): per-neuron rho_max 0.1 against global rho_max 2.0.

    python benchmarks/rho_sweep.py [--grid neuron:0.1 neuron:0.2 global:2.0 global:1.0] [--seeds 0 1]
                                   [--finetune-epochs 1] [--budgets 0.5] [--out runs/bench-robustness-12]
                                   [--results benchmarks/results/rho-pilot-12] [--probe]

Eq. 4 of the AdaSAP paper normalises each neuron's perturbation by that neuron's own gradient norm;
read literally, the total perturbation grows with the square root of the number of neurons (448 on
ResNet-20), so the paper's rho_max 2.0 becomes rho_max 0.1 here (``--rho-norm neuron``, the
default). The other reading divides by one global norm and keeps rho_max 2.0 (``--rho-norm global``).
No official code says which the authors meant; this pilot measures both and a neighbour of each.

Every arm is a ``latprune run --method adasap --rho-norm N --rho-max R`` cell of
``robustness.py`` (same dense model, the budget's one plan timed once, ``--floor-widths``, the same
schedule and seeds), so the only difference is the radius. Judged on what the radius should change:
validation loss and accuracy right after the last removal (BatchNorm re-estimated, before
fine-tuning), then clean and corruption accuracy after ``--finetune-epochs``; paired per seed
against the first arm of ``--grid``. A pilot: two seeds and one epoch of fine-tuning by default.
Cells resume like ``robustness.py``'s (summaries in ``--results``, kept in git).
"""
from __future__ import annotations

from robustness import Arm, cell_flags, finish, parser, probe, run_cells

from latprune.pipeline.adasap import RHO_NORMS


def _arm(spec: str) -> tuple[str, Arm]:
    norm, _, rho = spec.partition(":")
    if norm not in RHO_NORMS or not rho:
        raise SystemExit(f"--grid {spec}: write NORM:RHO_MAX with NORM one of {', '.join(RHO_NORMS)}, e.g. global:2.0")
    rho_max = float(rho)
    return f"adasap-{norm}-{rho_max:g}", Arm(f"AdaSAP, {norm} norm, rho_max {rho_max:g}", "adasap",
                                               ("--rho-norm", norm, "--rho-max", f"{rho_max:g}"), cost=2.0)


def main() -> None:
    p = parser(__doc__, "benchmarks/results/rho-pilot-12")
    p.set_defaults(seeds=[0, 1], finetune_epochs=1.0)
    p.add_argument("--grid", nargs="+", default=["neuron:0.1", "neuron:0.2", "global:2.0", "global:1.0"],
                   help="NORM:RHO_MAX per arm; the first is the reference of the paired differences")
    a = p.parse_args()
    table = dict(_arm(g) for g in a.grid)
    names = list(table)
    if a.probe:
        probe(a, table, names)
        return
    cells, dense = run_cells(a, table, names, cell_flags(a))
    finish(a, table, cells, dense, names[0], "rho_pilot.json")


if __name__ == "__main__":
    main()
