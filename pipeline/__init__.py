"""L4: the pipeline: importance, knapsack, plan, closed loop, AdaSAP, schedule, stages, gates, report, run."""
