"""The product benchmarks behind docs/BENCHMARKS.md: training throughput, the certified Wasserstein
bracket against POT, the cost of the evaluation callbacks, and sample quality on the digits.

Run from the repository root: `python -m benchmarks.run_all [--quick]` (every table, then the page),
or one of them, `python -m benchmarks.throughput | transport | fid_cost | quality [--quick]`.
Results go to benchmarks/results/. The research studies live in `studies/` (docs/STUDIES.md).
"""
