"""The mathematics of the primal-dual link, as pure torch functions (no Lightning): the f-divergence
registry, the dual side (critic values, certified dual values), Gaussian codes and the critic-free
Monte Carlo D_f, MMD, priors, and certified Lipschitz bounds. See docs/theory.md.

Modules are imported by name (`from maths.divergences import get_divergence`); this package
imports nothing, so that `transport` and `maths` can use each other's modules without cycles.
"""
