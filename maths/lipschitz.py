"""Operator norms of layers and a certified Lipschitz bound for critics (docs/theory.md 4.3).

The f-GAN dual value  E_{P_X}[h] - E_{P_G}[(lambda f)*(h)]  is a certified lower bound on
W_c(P_X, P_G) (c = l2) only if the critic h is 1-Lipschitz:  |h(x) - h(y)| <= ||x - y||_2.
For a network that is a composition  h = phi_L o A_L o ... o phi_1 o A_1  of affine layers
A_i(x) = W_i x + b_i and activations phi_i,

    Lip(h) <= prod_i ||W_i||_op * prod_i Lip(phi_i),                                    (1)

where ||W||_op = sup_{||x||_2 = 1} ||W x||_2 is the largest singular value of the layer's
*linear part* x -> A(x) - A(0) as a map on whole inputs (for a convolution: on images of the
shape it actually receives, with its stride, padding and dilation).

torch's `spectral_norm` divides a conv kernel by the largest singular value of the kernel
reshaped to an (out, in * kh * kw) matrix. That is not ||W||_op of the convolution: every input
pixel is read by up to ceil(kh / s) * ceil(kw / s) overlapping patches, so the operator norm can
exceed it by a factor up to sqrt(ceil(kh / s) * ceil(kw / s)) (3 for a 3x3 stride-1 kernel). So a
"spectrally normalised" conv critic is not certified by its construction; `lipschitz_upper_bound`
computes (1) from the layers themselves.

How each factor is obtained:
- nn.Linear: ||W||_2 exactly, by an SVD in float64.
- nn.Conv1d/2d/3d (any stride, padding, padding_mode, dilation, groups) and average pooling:
  power iteration on A^T A in float64, the product A^T (A x) obtained as the vector-Jacobian
  product of the linear map (autograd; for a conv it is conv_transpose with the matching
  output_padding), accelerated by Lanczos (the same products, but the estimate is the best over
  the Krylov space, not the last iterate: plain power iteration stalls for many iterations on the
  clustered top singular values of convolutions). The estimate never exceeds ||A||_op: it
  converges from BELOW. We run to convergence (Ritz residual <= tol relative, ARPACK's test) and
  return the estimate times (1 + 10 tol): a safety margin that makes the value an upper bound once
  converged. (A residual test shows convergence to an eigenvalue; that it is the top one rests on
  the random start, as for every power method; a warning is issued if max_iter is reached first.)
- Activations (their Lipschitz constants): ReLU, ReLU6, Hardtanh, Tanh, Softplus (beta > 0),
  Identity, Flatten, Unflatten, `Squeeze` and `MaxMin` (sorts feature pairs) 1; LeakyReLU max(1, |slope|); PReLU
  max(1, max |a|); ELU / CELU max(1, alpha); Sigmoid 1/4; GELU 1.13; SiLU 1.1;
  Dropout 1 in eval mode; MaxPool sqrt(m), m the largest number of pooling windows that share an
  input entry (m = 1 for non-overlapping windows: a max is 1-Lipschitz in l_inf per window).
- Anything else (BatchNorm, LayerNorm, attention, unknown custom leaves) raises ValueError:
  no certificate can be given for it.

The certificate is for the network in eval mode (how the dual value is evaluated at
validation): parametrized weights (spectral_norm and friends) are read in eval mode, where they
do not run their power-iteration update, and no module state is changed.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maths.layers import MaxMin, Squeeze, eval_mode

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AFFINE = (nn.Linear, *_CONVS, *_AVG_POOLS)  # layers whose operator norm is computed
_LIP_ONE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten, Squeeze, MaxMin)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # mps has no float64


def _linear_map(layer: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """x -> layer(x) - layer(0) for a supported layer, with the weight read once in eval mode."""
    if isinstance(layer, _AVG_POOLS):
        return layer  # linear, no parameters
    if isinstance(layer, (nn.Linear, *_CONVS)):
        with eval_mode(layer), torch.no_grad():
            weight = layer.weight.detach().to(dtype)  # parametrizations evaluated without updates
        if isinstance(layer, nn.Linear):
            return lambda x: F.linear(x, weight)
        return lambda x: layer._conv_forward(x, weight, None)  # handles padding_mode too
    raise TypeError(f"No operator norm for {type(layer).__name__}; supported: {[t.__name__ for t in _AFFINE]}.")


def _top_eigenvalue(
    matvec: Callable[[Tensor], Tensor], start: Tensor, tol: float, max_iter: int, basis: int = 128
) -> tuple[float, bool]:
    """Largest eigenvalue of a symmetric PSD operator M (as a flat-vector matvec) by Lanczos with full
    reorthogonalisation, restarted from the top Ritz vector every `basis` steps.

    Lanczos is power iteration that keeps the whole Krylov space span{q, Mq, ..., M^k q}: the same
    matvecs, but the estimate (top Ritz value theta_k) is the best Rayleigh quotient over that space,
    so theta_k >= the power-iteration estimate, and theta_k <= lambda_max always (from below). Stops
    when the Ritz residual ||M y - theta y|| = beta_k |s_k| <= tol * theta (ARPACK's test; more robust
    than the relative change of theta, which stalls on clusters), or when the Krylov space is invariant
    or the whole space (then theta is exact). Returns (theta, converged).
    """
    n = start.numel()
    size = min(basis, n)
    krylov = torch.zeros(size, n, dtype=start.dtype, device=start.device)  # orthonormal rows
    # The small tridiagonal T = Q^T M Q lives on the CPU (its eigh is tiny); its Ritz vectors go back to
    # the Krylov basis's device for the restart.
    tri = torch.zeros(size, size, dtype=torch.float64)
    q, theta, used = start / start.norm(), 0.0, 0
    while used < max_iter:
        krylov.zero_()
        tri.zero_()
        krylov[0] = q
        for k in range(min(size, max_iter - used)):
            w = matvec(krylov[k])  # (n,)
            used += 1
            tri[k, k] = float(w @ krylov[k])
            basis_k = krylov[: k + 1]  # (k + 1, n)
            for _ in range(2):  # full reorthogonalisation, "twice is enough"
                w = w - basis_k.T @ (basis_k @ w)
            beta = float(w.norm())
            evals, evecs = torch.linalg.eigh(tri[: k + 1, : k + 1])  # ascending
            theta = float(evals[-1])
            residual = beta * abs(float(evecs[-1, -1]))  # ||M y - theta y|| for the Ritz vector y
            if residual <= tol * theta or beta <= 1e-14 * max(theta, 1e-300) or k + 1 == n:
                return theta, True
            if k + 1 < size:
                tri[k, k + 1] = tri[k + 1, k] = beta
                krylov[k + 1] = w / beta
        ritz = basis_k.T @ evecs[:, -1].to(device=krylov.device, dtype=krylov.dtype)  # (n,): restart from the top Ritz vector
        q = ritz / ritz.norm()
    return theta, False


def linear_operator_norm(
    layer: nn.Module,
    input_shape: tuple[int, ...],
    tol: float = 1e-6,
    max_iter: int = 2000,
    generator: torch.Generator | None = None,
) -> float:
    """l2 operator norm (largest singular value) of x -> layer(x) - layer(0) on one sample.

    layer: nn.Linear, nn.Conv1d/2d/3d or nn.AvgPool1d/2d/3d, parametrized or not (read in eval mode,
    no state changed). input_shape: one sample's shape, no batch dimension, e.g. (C, H, W).
    Linear: exact, ||W||_2 by SVD in float64. Others: ||A||_op = sqrt(lambda_max(A^T A)), by
    (Lanczos-accelerated) power iteration in float64 from a random start (`generator`; default a
    fixed seed: reproducible, global RNG untouched), A^T A x computed as the vector-Jacobian product
    of A at x with cotangent A x. The estimate converges from below; at convergence (residual test
    with `tol`, see `_top_eigenvalue`) it is returned times (1 + 10 tol), an upper bound.
    """
    # Autograd gives the convolutions' adjoints: out of inference mode (Lightning's trainer.validate
    # runs hooks in it), so that the weights read here are ordinary tensors.
    with torch.inference_mode(False):
        return _operator_norm(layer, input_shape, tol, max_iter, generator)


def _operator_norm(
    layer: nn.Module, input_shape: tuple[int, ...], tol: float, max_iter: int, generator: torch.Generator | None
) -> float:
    with eval_mode(layer), torch.no_grad():
        weight = getattr(layer, "weight", None)  # pooling layers have none
        if weight is not None and not bool(torch.isfinite(weight.detach()).all()):  # eigh would fail obscurely
            raise ValueError(f"{layer} has non-finite weights (NaN or inf): its operator norm, and any Lipschitz bound "
                             "through it, is undefined. Was the network trained past a non-finite loss?")
    if isinstance(layer, nn.Linear):
        with eval_mode(layer), torch.no_grad():
            weight = layer.weight.detach()
        return float(torch.linalg.matrix_norm(weight.to(_work_dtype(weight.device)), ord=2))
    param = next(layer.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = _work_dtype(device)
    linear = _linear_map(layer, dtype)
    shape = (1, *input_shape)

    def gram(v: Tensor) -> Tensor:  # (n,) -> (n,): A^T A v
        with torch.enable_grad():
            x = v.reshape(shape).detach().requires_grad_(True)
            y = linear(x)  # (1, *output_shape)
            (ata_x,) = torch.autograd.grad(y, x, grad_outputs=y)
        return ata_x.reshape(-1)

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    start = torch.randn(math.prod(shape), generator=generator, dtype=dtype).to(device)  # (n,)
    with torch.no_grad():
        lam, converged = _top_eigenvalue(gram, start, tol, max_iter)
    if not converged:
        warnings.warn(
            f"Operator norm of {type(layer).__name__} on {tuple(input_shape)}: no convergence in {max_iter} "
            f"iterations (tol={tol}); the value may be an underestimate.",
            RuntimeWarning,
            stacklevel=2,
        )
    return math.sqrt(max(lam, 0.0)) * (1.0 + 10.0 * tol)


def _max_pool_constant(pool: nn.Module) -> float:
    """sqrt(m), m = the most pooling windows that contain one input entry: each output moves by at
    most the largest change in its window, so sum_j dout_j^2 <= sum_j sum_{i in W_j} dx_i^2 <= m ||dx||^2."""
    dims = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(pool)]

    def per_dim(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

    m = 1
    for k, s, d in zip(per_dim(pool.kernel_size), per_dim(pool.stride or pool.kernel_size), per_dim(pool.dilation)):
        m *= min(k, math.ceil(((k - 1) * d + 1) / s))
    return math.sqrt(m)


def _activation_constant(module: nn.Module) -> float | None:
    """Lipschitz constant of a known parameter-free (or PReLU) module, None if unknown."""
    if isinstance(module, _LIP_ONE):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(module.weight.detach().abs().max()))
    if isinstance(module, (nn.ELU, nn.CELU)):
        return max(1.0, float(module.alpha))
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.GELU):
        return 1.13  # max of d/dx x Phi(x) = 1.1289 (also for the tanh approximation, 1.1290)
    if isinstance(module, nn.SiLU):
        return 1.1  # max of d/dx x sigmoid(x) = 1.0998
    if isinstance(module, _MAX_POOLS):
        return _max_pool_constant(module)
    if isinstance(module, nn.Dropout) and not module.training:
        return 1.0  # identity in eval mode
    return None


def _units(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
    """Layers and activations inside `module`, in registration order; ValueError on unknown leaves."""
    if isinstance(module, _AFFINE) or _activation_constant(module) is not None:
        yield name, module
        return
    children = list(module.named_children())
    if not children:
        why = "it is not a known affine layer or activation"
        if isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            why = "normalisation layers divide by batch / sample statistics, which has no bounded slope"
        elif isinstance(module, nn.Dropout):
            why = "dropout in training mode rescales by 1 / (1 - p) at random"
        raise ValueError(
            f"Cannot certify a Lipschitz bound: module {name or '<root>'!r} ({type(module).__name__}) is not "
            f"allowed: {why}. Allowed: Linear, Conv1d/2d/3d, AvgPool, MaxPool and 1-Lipschitz-known activations."
        )
    for child_name, child in children:
        yield from _units(child, f"{name}.{child_name}" if name else child_name)


def lipschitz_upper_bound(network: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Certified upper bound on Lip(network) (l2 -> l2; absolute value for a scalar output), eq. (1).

    input_shape: one sample's shape, no batch dimension. The network's leaf modules are walked
    (containers and custom modules are descended into); every leaf must be a supported affine
    layer or a known activation, else ValueError naming it. One dummy forward of a (1, *input_shape)
    zero tensor in eval mode, with forward hooks, records the order in which the layers run and the
    input shape of each; the bound is the product over those calls of the layers' operator norms
    (`linear_operator_norm`) and the activations' constants.

    Assumption: the leaf modules are applied in sequence, each to the previous one's output (the
    project's critics: MLPs and ConvEncoder + Squeeze). Residual connections, concatenations or
    functional operations in a custom forward (other than reshaping) are not seen and not covered.
    The bound is for the eval-mode network and is computed without changing any module state.
    """
    units = dict(_units(network, ""))  # name -> module, validated
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []  # (module, per-sample input shape) in forward order

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        calls.append((module, tuple(inputs[0].shape[1:])))

    param = next(network.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    unique = {id(m): m for m in units.values()}  # a shared module is hooked once
    handles = [m.register_forward_hook(record) for m in unique.values()]
    try:
        with eval_mode(network), torch.no_grad():
            network(torch.zeros((1, *input_shape), dtype=dtype, device=device))  # (1, *input_shape)
    finally:
        for handle in handles:
            handle.remove()

    bound = 1.0
    for module, shape in calls:
        if isinstance(module, _AFFINE):
            bound *= linear_operator_norm(module, shape)
        else:
            bound *= _activation_constant(module)  # not None: checked by _units
    return bound


def empirical_lipschitz(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """max_i |fn(x)_i - fn(y)_i| / ||x_i - y_i||_2 over pairs with x_i != y_i: a LOWER estimate of
    Lip(fn) from data (docs/theory.md 4.2: estimated, not certified). x, y: (B, ...); fn: (B, ...) -> (B,).
    Returns a 0-dim tensor (0 if every pair coincides)."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    dist = (x - y).flatten(start_dim=1).norm(dim=1)  # (B,)
    gap = (fn(x) - fn(y)).abs().reshape(-1)  # (B,)
    if gap.shape != dist.shape:
        raise ValueError(f"fn must map (B, ...) to (B,), got {gap.numel()} values for B = {dist.numel()}.")
    keep = dist > 0
    if not bool(keep.any()):
        return torch.zeros((), dtype=gap.dtype, device=gap.device)
    return (gap[keep] / dist[keep]).max()
