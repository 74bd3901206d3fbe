"""The numeric helpers of the lambda-limit studies (studies/transport_encoder.py, studies/dual_limit.py)
against independent references: POT's exact transport and closed forms. Run from the repository
root (`python -m pytest`), where the `studies` package is importable."""

import math

import numpy as np
import pytest
import torch

from studies.dual_limit import extrapolate
from studies.transport_encoder import assignment, best_primal, transport_encoder_terms

ot = pytest.importorskip("ot")


def test_assignment_cost_is_the_exact_wasserstein_distance_of_pot():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 2, generator=g, dtype=torch.float64), torch.randn(300, 2, generator=g, dtype=torch.float64) + 1
    order, cost = assignment(x, y)
    reference = ot.emd2(np.full(300, 1 / 300), np.full(300, 1 / 300), ot.dist(x.numpy(), y.numpy(), metric="euclidean"))
    assert sorted(order.tolist()) == list(range(300))  # a permutation
    assert cost == pytest.approx(float(reference), rel=1e-9)
    assert float((x - y[order]).norm(dim=1).mean()) == pytest.approx(cost, rel=1e-12)


def test_extrapolation_recovers_the_limit_of_an_exact_rate():
    sizes = [500, 1000, 2000, 4000]
    assert extrapolate(sizes, [0.5 + 2 / math.sqrt(n) for n in sizes])["w_inf_sqrt"] == pytest.approx(0.5, abs=1e-9)
    assert extrapolate(sizes, [0.3 + math.log(n) / math.sqrt(n) for n in sizes])["w_inf_log_sqrt"] == pytest.approx(0.3, abs=1e-9)


def test_transport_encoder_terms_match_closed_forms_for_the_identity_generator():
    """G = identity and x_i = z_i: width s moves each code by about s * eps, so recon ~ s E|eps| =
    s sqrt(pi / 2); the collapsed width s = 1 gives D_f = 0 and recon = E|x - eps| = sqrt(pi)."""
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    terms = {t["width"]: t for t in transport_encoder_terms(lambda u: u, z, z, ["kl"], seed=0)}
    assert terms[0.02]["recon"] == pytest.approx(0.02 * math.sqrt(math.pi / 2), rel=0.05)
    assert terms[1.0]["recon"] == pytest.approx(math.sqrt(math.pi), abs=0.03)
    assert terms[1.0]["D_kl"] == 0.0
    assert terms[0.02]["D_kl"] > terms[0.2]["D_kl"] > terms[0.7]["D_kl"]  # spikier mixtures are farther from P_Z
    best = best_primal(list(terms.values()), "kl", 1e6)  # lambda huge: only the collapsed encoder is cheap
    assert best["width"] == 1.0 and best["primal"] == pytest.approx(math.sqrt(math.pi), abs=0.03)
