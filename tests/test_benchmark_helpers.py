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


def test_mean_sd_skips_missing_and_non_finite_values():
    import statistics

    from benchmarks.common import mean_sd

    values = [1.0, None, 4.0, float("nan"), 7.0, float("inf")]
    assert mean_sd(values) == (statistics.mean([1.0, 4.0, 7.0]), statistics.stdev([1.0, 4.0, 7.0]))
    assert mean_sd([2.5]) == (2.5, 0.0) and mean_sd([None, float("nan")]) == (None, None)


def test_quality_tables_give_each_model_only_the_network_arguments_it_has():
    from benchmarks.quality_mnist import equal_networks
    from lightning_modules import FGAN, WAE, PrimalDual, SinkhornGenerator

    base = {"latent_dim": 8}
    wae = equal_networks("lightning_modules.WAE", base)
    fgan = equal_networks("lightning_modules.FGAN", base)
    pd = equal_networks("lightning_modules.PrimalDual", base)
    sink = equal_networks("lightning_modules.SinkhornGenerator", base)
    assert wae["critic_width"] == 256 and "critic_channels" not in wae and wae["upsample"] == "resize"
    assert fgan["critic_channels"] == [32, 64] and fgan["generator_channels"] == [128, 64, 32]
    assert pd["critic_channels"] == [32, 64] and pd["latent_critic_width"] == 256 and pd["decoder_channels"] == [128, 64, 32]
    assert "critic_channels" not in sink and sink["generator_channels"] == [128, 64, 32]
    for cls, args in ((WAE, wae), (FGAN, fgan), (PrimalDual, pd), (SinkhornGenerator, sink)):
        model = cls(data_shape=(1, 28, 28), **args)  # every argument is one the class takes
        assert model.sample(2).shape == (2, 1, 28, 28)
