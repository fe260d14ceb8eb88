"""L2: latency tables (torch-free table and prediction), the one timing harness, the runtimes, profiling."""
