"""Research studies of the primal-dual link: the inequality chain dual <= primal <= W_c over lambda
and divergences, its large-lambda limits, how far a certified critic gets, mode coverage of the
f-GAN and of the OT-trained generator, and the latent critic's estimate with a deterministic encoder.

Run from the repository root, `python -m studies.NAME --help`; each writes its tables and figures to
studies/results/. docs/STUDIES.md holds, per study, the question, the command, and what the
committed results say. The studies reuse the benchmarks' table and result-file helpers
(`benchmarks.common`); the benchmarks import nothing from here.
"""
