"""Gaussian encoders: their codes, and a critic-free Monte Carlo estimate of D_f(Q_Z || P_Z)
(docs/theory.md 3.2 and 4.5).

A Gaussian stochastic encoder maps x_i to N(mu_i, diag sigma_i^2). On a finite sample of N codes
the aggregated posterior is the mixture

    q(z) = (1/N) sum_i N(z; mu_i, diag sigma_i^2),

whose density is known, and for a prior with a density p (the standard normal),

    D_f(Q_Z || P_Z) = E_{z ~ P_Z}[ f(q(z) / p(z)) ]

has unbiased Monte Carlo estimates with no critic at all:

- proposal "prior": (1/M) sum_j f(r(z_j)), z_j ~ P_Z i.i.d., r = q / p. Unbiased, but when Q_Z is
  concentrated (small sigma_i, as trained encoders make them) f(r) is huge on a set that P_Z almost
  never hits: the estimate and its standard error can then both be ~0 while D_f is large.
- proposal "balanced" (the default): importance sampling from m = (P_Z + Q_Z) / 2, stratified, half
  the draws from each:  D_f = E_m[(p/m) f(r)]  with weight p/m = 2 / (1 + r) <= 2, so the estimate
  is (1/2) mean_{z ~ P_Z}[w f(r)] + (1/2) mean_{z ~ Q_Z}[w f(r)]. Unbiased as well; its second moment
  is at most twice the prior proposal's (w <= 2), and draws from Q_Z see where Q_Z is.

Everything is computed in log space, in float64: log q by a logsumexp over the components, r only
through l = log q - log p, and f(exp(l)) in a closed form per registry row (`f_of_log_ratio`) that
neither overflows nor cancels (e.g. reverse_kl is -l, which stays finite where exp(l) underflows).

What is estimated: D_f between the mixture over the N codes given and P_Z, unbiased for that.
As an estimate of D_f between the population Q_Z and P_Z it is biased upwards (D_f is convex in
its first argument, so E[D_f(Q_N || P)] >= D_f(E Q_N || P)), by a lot when sigma_i is small next to
the spacing of the N means (the mixture is then spiky); the bias shrinks as N grows.

Only the gaussian prior is supported. `sphere` has no density with respect to Lebesgue measure on
R^d (it lives on a (d-1)-dimensional surface), so the Gaussian mixture Q_Z and P_Z are mutually
singular and q / p does not exist. `cube` has bounded support while every Gaussian component puts
mass outside [-1, 1]^d; E_{P_Z}[f(q/p)] then misses that mass (the true D_f adds
f'(inf) Q_Z(outside), infinite for kl and pearson, docs/theory.md 2.1), so the formula would silently
underestimate.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from maths.choices import check_choice
from maths.divergences import FDivergence, get_divergence
from maths.precision import autocast_off, promoted
from maths.priors import check_prior_name

LOG2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)
# The Gaussian encoder's log-variance is clamped to this range (sigma in [e^-5, e^2.5]): it keeps
# the reparameterised codes and the mixture density finite early in training.
LOG_VAR_RANGE: tuple[float, float] = (-10.0, 5.0)
PROPOSALS: tuple[str, ...] = ("balanced", "prior")
EncoderType = Literal["deterministic", "gaussian"]
ENCODER_TYPES: tuple[str, ...] = get_args(EncoderType)


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), accurate everywhere (torch's softplus returns x itself above x = 20)."""
    return torch.logaddexp(x, torch.zeros_like(x))


# f(exp(l)) for each registry row (unscaled), written so that large |l| neither overflows nor cancels.
_F_OF_EXP: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": lambda l: torch.exp(l) * l,  # u log u
    "reverse_kl": lambda l: -l,  # -log u
    "pearson": lambda l: torch.expm1(l) ** 2,  # (u - 1)^2
    "neyman": lambda l: torch.expm1(l) ** 2 * torch.exp(-l),  # (1 - u)^2 / u
    "hellinger": lambda l: torch.expm1(0.5 * l) ** 2,  # (sqrt(u) - 1)^2
    # u log u - (u + 1) log((u + 1) / 2) = u (log 2 - softplus(-l)) - softplus(l) + log 2
    "jensen_shannon": lambda l: torch.exp(l) * (LOG2 - _softplus(-l)) - _softplus(l) + LOG2,
    # u log u - (u + 1) log(u + 1) = -u softplus(-l) - softplus(l)
    "gan": lambda l: -torch.exp(l) * _softplus(-l) - _softplus(l),
    "total_variation": lambda l: 0.5 * torch.abs(torch.expm1(l)),  # |u - 1| / 2
}


# f(exp(l)) / exp(l), the same rows divided by u: what the importance weight p/m multiplies for large l.
_F_OF_EXP_OVER_EXP: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": lambda l: l,
    "reverse_kl": lambda l: -l * torch.exp(-l),
    "pearson": lambda l: torch.expm1(l) * -torch.expm1(-l),  # (u - 1)^2 / u
    "neyman": lambda l: torch.expm1(-l) ** 2,  # (1 - u)^2 / u^2
    "hellinger": lambda l: torch.expm1(-0.5 * l) ** 2,  # (1 - u^(-1/2))^2
    "jensen_shannon": lambda l: LOG2 - _softplus(-l) - torch.exp(-l) * (_softplus(l) - LOG2),
    "gan": lambda l: -_softplus(-l) - torch.exp(-l) * _softplus(l),
    "total_variation": lambda l: 0.5 * torch.abs(torch.expm1(-l)),  # |1 - 1/u| / 2
}


class MonteCarloEstimate(NamedTuple):
    """An estimate with its standard error and the number of draws behind it."""

    value: Tensor  # 0-dim
    std_error: Tensor  # 0-dim
    num_samples: int


def gaussian_code_parameters(out: Tensor) -> tuple[Tensor, Tensor]:
    """Split a Gaussian encoder's output (B, 2 d) into mean (B, d) and log-variance (B, d), the
    latter clamped to LOG_VAR_RANGE."""
    if out.ndim != 2 or out.shape[1] % 2:
        raise ValueError(f"A Gaussian encoder's output must have shape (B, 2 d), got {tuple(out.shape)}.")
    mean, log_var = out.chunk(2, dim=1)
    return mean, log_var.clamp(*LOG_VAR_RANGE)


def reparameterize(mean: Tensor, log_var: Tensor) -> Tensor:
    """One draw z = mean + exp(log_var / 2) * eps, eps ~ N(0, I), differentiable in both. (B, d)."""
    return mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)


def check_monte_carlo_prior(prior: str) -> None:
    """ValueError unless the prior has a density on R^d that the estimate can use (the gaussian)."""
    check_prior_name(prior)
    if prior == "sphere":
        raise ValueError(
            "The Monte Carlo estimate of D_f(Q_Z || P_Z) needs the density ratio q/p, but the sphere "
            "prior has no density with respect to Lebesgue measure on R^d (it lives on the unit sphere), "
            "so a Gaussian-mixture Q_Z and P_Z are mutually singular. Use prior='gaussian', or the latent "
            "critic's estimate (primal_estimator='critic')."
        )
    if prior == "cube":
        raise ValueError(
            "The Monte Carlo estimate of D_f(Q_Z || P_Z) = E_{P_Z}[f(q/p)] needs Q_Z to live inside the "
            "support of P_Z, but the cube prior is supported on [-1, 1]^d while every Gaussian component of "
            "Q_Z puts mass outside it: the formula would miss that mass (the true D_f adds f'(inf) times it, "
            "infinite for kl and pearson). Use prior='gaussian', or the latent critic's estimate (primal_estimator='critic')."
        )


def prior_log_density(z: Tensor, prior: str = "gaussian") -> Tensor:
    """log p(z) for the standard normal prior. (M, d) -> (M,)."""
    check_monte_carlo_prior(prior)
    return -0.5 * (z.pow(2).sum(dim=1) + z.shape[1] * LOG_2PI)


def mixture_log_density(z: Tensor, mean: Tensor, log_var: Tensor, chunk_elements: int = 2**22) -> Tensor:
    """log q(z) for q = (1/N) sum_i N(mu_i, diag exp(log_var_i)). z: (M, d); mean, log_var: (N, d) -> (M,).

    Direct differences (no expansion of the square, which cancels for small variances), the
    (chunk, N, d) tensor kept under `chunk_elements` entries.
    """
    if mean.ndim != 2 or mean.shape != log_var.shape or z.ndim != 2 or z.shape[1] != mean.shape[1]:
        raise ValueError(
            f"mixture_log_density needs z (M, d), mean (N, d) and log_var (N, d), got {tuple(z.shape)}, "
            f"{tuple(mean.shape)} and {tuple(log_var.shape)}."
        )
    n, d = mean.shape
    inv_var = torch.exp(-log_var)  # (N, d)
    log_norm = -0.5 * (log_var.sum(dim=1) + d * LOG_2PI)  # (N,)
    chunk = max(1, chunk_elements // max(n * d, 1))
    out = []
    for z_chunk in z.split(chunk):  # (m, d)
        diff = z_chunk[:, None, :] - mean[None, :, :]  # (m, N, d)
        log_components = log_norm - 0.5 * (diff.pow(2) * inv_var).sum(dim=2)  # (m, N)
        out.append(torch.logsumexp(log_components, dim=1) - math.log(n))  # (m,)
    return torch.cat(out)


def f_of_log_ratio(divergence: str | FDivergence, log_ratio: Tensor) -> Tensor:
    """lambda f(exp(l)) elementwise for a registry row, stable for large |l|."""
    div = divergence if isinstance(divergence, FDivergence) else get_divergence(divergence)
    return div.scale * _F_OF_EXP[div.name](log_ratio)


def importance_weighted_f(divergence: str | FDivergence, log_ratio: Tensor) -> Tensor:
    """2 lambda f(r) / (1 + r) for r = exp(l): f weighted by p/m, m = (p + q)/2. Written as
    2 sigmoid(-l) f(e^l) for l <= 0 and 2 sigmoid(l) f(e^l)/e^l for l > 0, so that neither factor
    overflows (f(e^l) alone is inf for l > 709 in float64 while the product is finite)."""
    div = divergence if isinstance(divergence, FDivergence) else get_divergence(divergence)
    l = log_ratio
    small = torch.where(l <= 0, l, torch.zeros_like(l))  # each branch only sees its own half
    large = torch.where(l > 0, l, torch.zeros_like(l))
    value = torch.where(
        l <= 0,
        2.0 * torch.sigmoid(-small) * _F_OF_EXP[div.name](small),
        2.0 * torch.sigmoid(large) * _F_OF_EXP_OVER_EXP[div.name](large),
    )
    return div.scale * value


def sample_mixture(mean: Tensor, log_var: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Draws from q = (1/N) sum_i N(mu_i, diag exp(log_var_i)): a uniform component, then its Gaussian.
    mean, log_var: (N, d) -> (num_samples, d), drawn on mean's device (`generator` lives there too)."""
    index = torch.randint(mean.shape[0], (num_samples,), generator=generator, device=mean.device)  # (M,)
    noise = torch.randn(num_samples, mean.shape[1], generator=generator, dtype=mean.dtype, device=mean.device)  # (M, d)
    return mean[index] + torch.exp(0.5 * log_var[index]) * noise


def monte_carlo_divergence(
    divergence: str | FDivergence,
    mean: Tensor,
    log_var: Tensor,
    num_samples: int = 4096,
    prior: str = "gaussian",
    generator: torch.Generator | None = None,
    proposal: str = "balanced",
) -> MonteCarloEstimate:
    """Unbiased estimate of D_f(Q || P_Z), Q the Gaussian mixture of the N codes, P_Z = N(0, I).

    divergence: registry name or FDivergence (its scale lambda multiplies f).
    mean, log_var: (N, d) parameters of the encoder's Gaussians (any float dtype; computed in float64).
    num_samples: M draws in all, on mean's device from `generator` (seeded: reproducible).
    proposal: "balanced" (M/2 draws from P_Z and M/2 from Q, weights p/m = 2/(1 + r); M >= 4) or
        "prior" (M draws from P_Z, (1/M) sum_j f(r_j); M >= 2); see the module docstring.
    Returns the estimate, its standard error and M, as float64 0-dim tensors on mean's device.
    """
    div = divergence if isinstance(divergence, FDivergence) else get_divergence(divergence)
    check_monte_carlo_prior(prior)
    check_choice("proposal", proposal, PROPOSALS)
    least = 4 if proposal == "balanced" else 2
    if num_samples < least:
        raise ValueError(
            f"num_samples must be at least {least} for proposal={proposal!r} (a standard error needs two "
            f"draws per stratum), got {num_samples}."
        )
    mean, log_var = mean.detach().double(), log_var.detach().double()
    if mean.ndim != 2 or mean.shape != log_var.shape:
        raise ValueError(
            f"monte_carlo_divergence needs mean (N, d) and log_var (N, d), got {tuple(mean.shape)} and "
            f"{tuple(log_var.shape)}."
        )

    def log_ratio(z: Tensor) -> Tensor:  # (M, d) -> (M,): log q(z) - log p(z)
        return mixture_log_density(z, mean, log_var) - prior_log_density(z, prior)

    num_prior = num_samples if proposal == "prior" else num_samples // 2
    z_prior = torch.randn(num_prior, mean.shape[1], generator=generator, dtype=torch.float64, device=mean.device)
    if proposal == "prior":
        values = f_of_log_ratio(div, log_ratio(z_prior))  # (M,)
        return MonteCarloEstimate(values.mean(), values.std() / math.sqrt(num_samples), num_samples)

    def weighted(l: Tensor) -> Tensor:  # (p / m) f(r) = 2 f(r) / (1 + r), r = e^l
        return importance_weighted_f(div, l)

    from_prior = weighted(log_ratio(z_prior))  # (M/2,)
    from_mixture = weighted(log_ratio(sample_mixture(mean, log_var, num_samples - num_prior, generator)))  # (M/2,)
    value = 0.5 * (from_prior.mean() + from_mixture.mean())
    std_error = 0.5 * torch.sqrt(from_prior.var() / len(from_prior) + from_mixture.var() / len(from_mixture))
    return MonteCarloEstimate(value, std_error, num_samples)


def batch_monte_carlo_divergence(
    divergence: str | FDivergence, mean: Tensor, log_var: Tensor, codes: Tensor, prior_draws: Tensor
) -> Tensor:
    """Differentiable estimate of D_f(Q_B || P_Z), Q_B the Gaussian mixture of a batch's B codes:
    the training loss of `PrimalDual(training_estimator="monte_carlo")`, with no critic.

    The balanced proposal of `monte_carlo_divergence`, stratified: D_f = E_m[(p/m) f(q/p)] with
    m = (P_Z + Q_B)/2 is estimated by (1/2) mean_j [w f(r)](prior_draws_j) + (1/2) mean_i [w f(r)](codes_i),
    w = p/m = 2/(1 + r), r = q_B/p, where codes_i = mu_i + sigma_i eps_i is ONE reparameterised draw
    per component (a stratified sample of Q_B, whose components weigh 1/B each). Unbiased for every
    (mu, sigma), and differentiable in them through r and through the codes (pathwise gradient), so
    its gradient is an unbiased estimate of the gradient of D_f(Q_B || P_Z).

    divergence: registry name or FDivergence (its scale multiplies f).
    mean, log_var: (B, d) encoder Gaussians; codes: (B, d) their reparameterised draws;
    prior_draws: (M, d) from the standard normal prior. Returns a 0-dim tensor (in mean's dtype,
    float32 for bfloat16 or float16 inputs: computed outside autocast).
    As an estimate of D_f for the population Q_Z it is biased upwards (a mixture of B narrow
    Gaussians is spikier than Q_Z), which pushes the encoder's sigma up to the spacing of the codes.
    """
    div = divergence if isinstance(divergence, FDivergence) else get_divergence(divergence)
    if mean.ndim != 2 or mean.shape != log_var.shape or codes.shape != mean.shape:
        raise ValueError(
            f"batch_monte_carlo_divergence needs mean, log_var and codes of one shape (B, d), got "
            f"{tuple(mean.shape)}, {tuple(log_var.shape)} and {tuple(codes.shape)}."
        )
    if prior_draws.ndim != 2 or prior_draws.shape[1] != mean.shape[1] or len(prior_draws) < 1:
        raise ValueError(f"prior_draws must have shape (M, {mean.shape[1]}) with M >= 1, got {tuple(prior_draws.shape)}.")

    mean, log_var, codes, prior_draws = (promoted(t) for t in (mean, log_var, codes, prior_draws))

    def weighted(z: Tensor) -> Tensor:  # (K, d) -> (K,): (p/m) f(q/p) at z
        log_ratio = mixture_log_density(z, mean, log_var) - prior_log_density(z)
        return importance_weighted_f(div, log_ratio)

    with autocast_off(mean.device):  # density ratios in float32 or float64 under mixed precision
        return 0.5 * (weighted(prior_draws).mean() + weighted(codes).mean())
