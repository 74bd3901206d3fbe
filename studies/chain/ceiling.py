"""The best value the model's critic class can reach, computed without training.

The critic is h = lambda g_f(v / lambda) with Lip(v) <= 1. Where g_f has slope below 1 at the
optimal h (jensen_shannon, gan and total_variation: slope 1/2 near h = lambda f'(1), where the
optimal critic sits for large lambda), Lip(h) is below 1 there and this class's dual tends to a
fraction of W_c, while GAN_{lambda f}(H_c) itself tends to W_c (docs/theory.md 2.6). kl and pearson
(g_f the identity) are not limited this way. `ceiling_table` measures the effect on a case with a
known answer, a Gaussian shift, so that the chain's trained values can be read against it.
"""

from __future__ import annotations

import torch


def ceiling_table(lambdas: list[float], divergences: list[str], shift: float = 2.0) -> list[dict]:
    """Best dual value of the model's critic class h = lambda g_f(v / lambda) with v(x) = s x + b,
    |s| <= 1 (1-Lipschitz), for P = N(shift, 1), Q = N(0, 1) in 1-D (W_1 = shift; the Kantorovich
    potential is x itself), by Gauss-Hermite quadrature and a bounded optimiser over (s, b). The
    closed forms of kl and pearson check the quadrature (an AssertionError when they disagree)."""
    import numpy as np
    from scipy.optimize import minimize

    from maths.divergences import get_divergence

    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()  # E over N(0, 1)
    rows = []
    for name in divergences:
        for lam in lambdas:
            div = get_divergence(name, lam)
            centre = div.neutral_output  # v0 with h(v0) = lambda f'(1): the optimal critic of P = Q

            def negative(params: np.ndarray) -> float:
                s, b = params
                v_p = torch.tensor(s * (nodes + shift) + b, dtype=torch.float64)
                v_q = torch.tensor(s * nodes + b, dtype=torch.float64)
                value = (weights * div.activation(v_p).numpy()).sum() - (weights * div.conjugate_of_activation(v_q).numpy()).sum()
                return -float(value)

            best = max(
                (minimize(negative, np.array([s0, centre + b0]), method="L-BFGS-B", bounds=[(-1, 1), (None, None)])
                 for s0 in (0.5, 1.0) for b0 in (0.0, -lam, lam)),
                key=lambda r: -r.fun,
            )
            rows.append({"divergence": name, "lambda": lam, "best_value": -best.fun, "slope": float(best.x[0]),
                         "value_over_w": -best.fun / shift})
            # closed forms for the identity activations: kl s d - s^2 / (2 lam), pearson s d - s^2 / (4 lam), best s
            if name in ("kl", "pearson"):
                k = 2.0 if name == "kl" else 4.0
                s = min(1.0, k * lam * shift / 2.0)
                exact = s * shift - s**2 / (k * lam)
                if abs(exact - rows[-1]["best_value"]) > 1e-5 * max(1.0, exact):
                    raise AssertionError(f"ceiling_table: {name}, lambda {lam}: quadrature {rows[-1]['best_value']} "
                                         f"!= closed form {exact}")
    return rows
