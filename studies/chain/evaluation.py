"""Every quantity of the chain dual <= primal <= W_c <= upper (docs/theory.md 4.1), computed in
float64 on the SAME n held-out points X and the SAME n generated points Y = G(z), z from a fixed seed:

- dual (raw): E_X[h] - E_Y[(lambda f)*(h)] with the trained critic h = lambda g_f(v / lambda);
- dual (certified): the same for v / max(1, L), L the certified Lipschitz bound of v
  (docs/theory.md 4.4): a critic in H_c, so dual_cert(X, Y) <= W_c(X, Y) is a THEOREM
  (Kantorovich-Rubinstein and f*(t) >= t + f(1)); it is recomputed here from the activation and
  checked against the module's own `critic.certified_value`, and `theorem_ok` records it;
- primal (MC): mean_X c(x, G(z_x)) (one draw z_x of the Gaussian encoder per point) + lambda *
  D_f(Q_X || P_Z) by the critic-free Monte Carlo estimate for the mixture Q_X of the n codes
  (docs/theory.md 4.5): unbiased for that mixture, biased UPWARDS for the population Q_Z (a
  mixture of n narrow Gaussians is spiky), no adversary in it;
- primal (critic): the same reconstruction + lambda * the latent critic's variational estimate
  (a lower estimate of D_f, floored at f(1)), the estimate the encoder is trained on;
- W_c exact: POT's network simplex between X and Y; bracket: the certified Sinkhorn bracket
  lower <= W_c(X, Y) <= upper (docs/theory.md 5), whose certificate is checked too (`bracket_ok`).

`dual <= primal` and `primal <= W_c` hold for the population quantities (the primal for the
OPTIMAL encoder, with D_f exact); here both sides are estimates, so they hold up to estimation
error: the rows carry standard errors.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from studies.chain.settings import BRACKET_SECONDS, BRACKET_TOL, COST, EVAL_SEED, MC_SAMPLES, NUM_LARGE, THEOREM_SLACK


def mean_and_error(terms: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error."""
    return float(terms.mean()), float(terms.std() / math.sqrt(len(terms)))


def transport_values(real: torch.Tensor, fake: torch.Tensor) -> dict[str, Any]:
    """Exact W_c and the certified bracket between the two sample sets, with the bracket's check."""
    from transport import exact_wasserstein, wasserstein_bracket

    exact = exact_wasserstein(real, fake, COST)
    bracket = wasserstein_bracket(real, fake, COST, tol=BRACKET_TOL, max_seconds=BRACKET_SECONDS)
    slack = THEOREM_SLACK * max(1.0, exact)
    return {
        "w_exact": exact,
        "w_lower": bracket.lower,
        "w_upper": bracket.upper,
        "bracket_width": bracket.relative_width,
        "bracket_converged": bracket.converged,
        "bracket_ok": bracket.lower <= exact + slack and exact <= bracket.upper + slack,
    }


def evaluate(model: Any, real: Any, seed: int = EVAL_SEED, more_real: Any = None) -> dict[str, Any]:
    """Every quantity of the chain (module docstring) on the held-out points `real` (n, ...) and n
    generated points from latent codes drawn with `seed`. With `more_real` (N, ...) fresh data
    points, the Monte Carlo D_f is also computed for the mixture of their N codes
    (`divergence_mc_more`, `primal_mc_more`): less spiky, so less biased upwards; and the population
    references of `population_reference`."""
    from maths.dual import f_at_one
    from maths.gaussian_codes import monte_carlo_divergence
    from maths.priors import sample_prior
    from transport.costs import cost

    m = copy.deepcopy(model).double().eval()
    x = real.double()
    n = len(x)
    lam = float(m.hparams.lambda_)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z_fake = sample_prior(m.prior, n, m.latent_dim, generator=generator, dtype=torch.float64)
        y = m.decode(z_fake)  # (n, *data_shape)

        # the dual, raw and certified, on (x, y), recomputed from the registry row
        div = m.data_divergence
        net_real, net_fake = m.critic(x), m.critic(y)  # (n,), (n,): the network's part of v
        offset = div.neutral_output  # v = network + offset; only the network's part is rescaled
        network_bound = m.critic.network_bound()
        scale = max(1.0, network_bound)
        dual_raw, dual_raw_se = mean_and_error(div.activation(net_real + offset)
                                               - div.conjugate_of_activation(net_fake + offset))
        cert_real = div.activation(net_real / scale + offset)
        cert_fake = div.conjugate_of_activation(net_fake / scale + offset)
        dual_cert = float(cert_real.mean() - cert_fake.mean())
        module_value = float(m.critic.certified_value(x, y))  # the module's own computation, the same number
        if not math.isclose(module_value, dual_cert, rel_tol=1e-9, abs_tol=1e-9):
            raise AssertionError(f"critic.certified_value {module_value} differs from the recomputed {dual_cert}")
        dual_cert_se = math.sqrt(float(cert_real.var() + cert_fake.var()) / n)

        # how steep the critic is where it matters: an optimal 1-Lipschitz critic has slope 1 along transport rays
        with torch.enable_grad():
            points = torch.cat([x, y]).requires_grad_(True)
            (grad,) = torch.autograd.grad(m.critic.value(points).sum(), points)
        slope = grad.flatten(start_dim=1).norm(dim=1)  # (2n,): |grad h| of the raw critic

        # the primal: one draw of the Gaussian encoder per point
        mean, log_var = m.encode_parameters(x)  # (n, d_z) each
        z = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        recon, recon_se = mean_and_error(cost(x, m.decode(z), COST))
        mc = monte_carlo_divergence(m.latent_divergence, mean, log_var, MC_SAMPLES, m.prior,
                                    generator=torch.Generator().manual_seed(seed + 1))
        z_prior = sample_prior(m.prior, n, m.latent_dim, generator=generator, dtype=torch.float64)
        critic_estimate = max(float(m.latent_critic.objective(z, z_prior)), f_at_one(m.latent_divergence))
        more, reference = None, {}
        if more_real is not None:
            more = monte_carlo_divergence(m.latent_divergence, *m.encode_parameters(more_real.double()), MC_SAMPLES,
                                          m.prior, generator=torch.Generator().manual_seed(seed + 2))
            reference = population_reference(m, more_real.double(), x, seed + 3)
    row = {
        "n": n,
        "lipschitz_bound": network_bound * div.activation_lipschitz,
        "dual_raw": dual_raw,
        "dual_raw_se": dual_raw_se,
        "dual_cert": dual_cert,
        "dual_cert_se": dual_cert_se,
        "critic_slope_median": float(slope.median()),
        "recon": recon,
        "divergence_mc": float(mc.value),
        "divergence_mc_se": float(mc.std_error),
        "divergence_critic": critic_estimate,
        "primal_mc": recon + lam * float(mc.value),
        "primal_mc_se": math.sqrt(recon_se**2 + (lam * float(mc.std_error)) ** 2),
        "primal_critic": recon + lam * critic_estimate,
        "encoder_sigma_median": float(torch.exp(0.5 * log_var).median()),
        "n_more": len(more_real) if more_real is not None else 0,
        "divergence_mc_more": float(more.value) if more is not None else math.nan,
        "primal_mc_more": recon + lam * float(more.value) if more is not None else math.nan,
        "primal_mc_more_se": math.hypot(recon_se, lam * float(more.std_error)) if more is not None else math.nan,
        **transport_values(x, y),
        **reference,
    }
    row["theorem_ok"] = row["dual_cert"] <= row["w_exact"] + THEOREM_SLACK * max(1.0, row["w_exact"])
    return row


def population_reference(m: Any, fresh: torch.Tensor, x: torch.Tensor, seed: int) -> dict[str, float]:
    """What the n-point W_c(X, Y) is an estimate of: `w_large`, the exact W_c between NUM_LARGE fresh
    data points and NUM_LARGE model points (closer to W_c(P_X, P_G): E W_c(samples) >= W_c(P_X, P_G),
    docs/theory.md 5.1), and `w_floor`, the exact W_c between X and n other data points (the
    population value is 0: what sampling alone adds at n points)."""
    from maths.priors import sample_prior
    from transport import exact_wasserstein

    n = len(x)
    if len(fresh) < NUM_LARGE + n:
        raise ValueError(f"population_reference needs {NUM_LARGE + n} fresh points, got {len(fresh)}")
    z = sample_prior(m.prior, NUM_LARGE, m.latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y_large = m.decode(z)  # (NUM_LARGE, *data_shape)
    return {"w_large": exact_wasserstein(fresh[:NUM_LARGE], y_large, COST),
            "w_floor": exact_wasserstein(x, fresh[-n:], COST), "n_large": NUM_LARGE}
