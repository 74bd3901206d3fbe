"""Both sides of the chain, optimised further against a FROZEN generator (docs/theory.md 4.1, 4.4, 4.5).

The dual GAN_{lambda f}(P_X, G; H_c) is a sup over critics and the primal fWAE_{c,lambda}(P_X, G) an
inf over encoders. Trained beside a moving G, both the critic and the encoder are weak points of
their optimisation problems; with G fixed at the end of training, these functions run more steps of
each, so that the chain study compares values closer to the sup and the inf for the final G.
Neither step can make a reported bound false: any critic gives a certified lower bound after the
division by max(1, L), and any encoder gives a primal value at least the inf.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


def refine_critic(model: Any, datamodule: Any, steps: int, seed: int) -> None:
    """`steps` more ascent steps of the data critic alone, on training batches against fresh samples of
    the frozen generator (the module's own critic loss and optimiser settings)."""
    if steps <= 0:
        return
    hp = model.hparams
    optimizer = torch.optim.Adam(model.critic.parameters(), lr=hp.critic_lr, betas=tuple(hp.betas))
    train_all_but_generator(model)
    torch.manual_seed(10_000 + seed)
    done = 0
    while done < steps:
        for batch in datamodule.train_dataloader():
            x = model.batch_data(batch)  # (B, *data_shape)
            fake = model.sample(len(x))  # no gradient: G is frozen
            loss = model.critic.loss(x, fake)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    model.eval()


def train_all_but_generator(model: Any) -> None:
    """Training mode for the critics and the encoder, evaluation mode for G: a frozen G must not move
    its batch-norm running statistics or its spectral norms' power iterations either."""
    model.train()
    model.decoder.eval()


def continuation_lambda(step: int, steps: int, lambda_: float, start: float, fraction: float) -> float:
    """The penalty weight at `step` of `steps`: geometric from min(start, lambda_) up to lambda_ over the
    first `fraction` of the steps, then lambda_."""
    start = min(start, lambda_)
    progress = min(1.0, step / max(1.0, fraction * steps))
    return start * math.exp(progress * math.log(lambda_ / start))


def refine_encoder(
    model: Any,
    datamodule: Any,
    steps: int,
    seed: int,
    batch_size: int = 1000,
    start_lambda: float = 0.1,
    anneal_fraction: float = 0.9,
    check_every: int = 100,
) -> int:
    """`steps` more descent steps of the Gaussian encoder alone on the critic-free primal
    recon + lambda' * D_f(Q_B || P_Z) (`batch_monte_carlo_divergence`, the estimate of
    `training_estimator="monte_carlo"`), G frozen, with two changes from training:

    - batches of `batch_size` training points: a mixture of B narrow Gaussians is spiky, so the
      estimate is biased upwards for the population Q_Z, and the bias (which pushes sigma up to the
      spacing of the codes) shrinks as B grows;
    - continuation in lambda: lambda' rises geometrically from `start_lambda` to lambda over the
      first `anneal_fraction` of the steps. Started at a large lambda, the encoder stays at the
      collapsed coupling Q(z|x) = P_Z (D_f = 0, recon = E c(X, G(Z)) for an independent Z), a
      stationary point far above W_c; at a small lambda it first learns a transport-like map, which
      the rising lambda then pushes towards Q_Z = P_Z.

    The primal is an inf, so the refinement keeps the best encoder it has seen: every `check_every`
    steps (and before the first) it scores the encoder by `primal_objective` at the target lambda on
    a fixed selection set of training points, and ends with the best-scoring weights (the trained
    encoder's, if nothing beat them). Continuation can fail: for a bounded f (jensen_shannon) the
    codes may leave the prior while lambda is small, and the saturated estimate then has no gradient
    to bring them back. The chain evaluates the result on held-out points, not on this set.

    The latent critic takes one ascent step per encoder step, so that its estimate (the "primal
    critic" column) follows the new Q_Z. The encoder's optimiser is a fresh Adam at the module's lr.
    Returns the step whose weights were kept (-1: the trained encoder's).
    """
    if steps <= 0:
        return -1
    from maths.gaussian_codes import batch_monte_carlo_divergence, reparameterize

    hp = model.hparams
    if hp.encoder_type != "gaussian":
        raise ValueError("refine_encoder needs a Gaussian encoder (encoder_type='gaussian').")
    data = torch.cat([model.batch_data(batch) for batch in datamodule.train_dataloader()])  # (N, *data_shape)
    encoder_opt = torch.optim.Adam(model.encoder.parameters(), lr=hp.lr, betas=tuple(hp.betas))
    latent_opt = torch.optim.Adam(model.latent_critic.parameters(), lr=hp.latent_critic_lr, betas=tuple(hp.betas))
    generator = torch.Generator().manual_seed(20_000 + seed)
    torch.manual_seed(20_000 + seed)
    selection = data[torch.randperm(len(data), generator=generator)[:batch_size]]  # (S, *data_shape)
    best = {"score": primal_objective(model, selection, seed), "step": -1,
            "state": copy.deepcopy(model.encoder.state_dict())}
    train_all_but_generator(model)
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    try:
        for step in range(steps):
            x = data[torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)]  # (B, ...)
            mean, log_var = model.encode_parameters(x)  # (B, d_z) each
            z = reparameterize(mean, log_var)  # (B, d_z)

            latent_objective = model.latent_critic.objective(z.detach(), model.sample_latent(len(x)))
            latent_opt.zero_grad()
            (-latent_objective).backward()
            latent_opt.step()

            lam = continuation_lambda(step, steps, float(hp.lambda_), start_lambda, anneal_fraction)
            penalty = batch_monte_carlo_divergence(model.latent_divergence, mean, log_var, z, model.sample_latent(len(x)))
            loss = model.reconstruction_cost(x, model.decode(z)) + lam * penalty
            encoder_opt.zero_grad()
            loss.backward()
            encoder_opt.step()

            if (step + 1) % check_every == 0 or step + 1 == steps:
                score = primal_objective(model, selection, seed)
                train_all_but_generator(model)
                if score < best["score"]:
                    best = {"score": score, "step": step + 1, "state": copy.deepcopy(model.encoder.state_dict())}
        model.encoder.load_state_dict(best["state"])
    finally:
        for p in model.decoder.parameters():
            p.requires_grad_(True)
        model.eval()
    return best["step"]


def primal_objective(model: Any, x: torch.Tensor, seed: int, num_samples: int = 4096) -> float:
    """recon + lambda * D_f(Q_S || P_Z) of the Gaussian encoder on the points x (S, *data_shape), with
    fixed draws (`seed`): one code per point, and `monte_carlo_divergence` for the mixture Q_S of
    their S Gaussians. The same draws for every call, so that encoders are compared on equal terms."""
    from maths.gaussian_codes import monte_carlo_divergence

    model.eval()
    generator = torch.Generator().manual_seed(30_000 + seed)
    with torch.no_grad():
        mean, log_var = model.encode_parameters(x)  # (S, d_z) each
        z = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        recon = float(model.reconstruction_cost(x, model.decode(z)))
        estimate = monte_carlo_divergence(model.latent_divergence, mean, log_var, num_samples, model.prior,
                                          generator=generator)
    return recon + float(model.hparams.lambda_) * float(estimate.value)
