"""The generator trained by entropic optimal transport: the loss against POT (both costs, both
objectives), its gradient against finite differences, which objective bounds W_c, the certified
bracket that SinkhornBoundCallback logs on it against exact transport, training on the ring of 8
Gaussians, checkpoints, matching of data and samples, bad input, and the configs through the CLI."""

import copy
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import SinkhornBoundCallback
from callbacks.modes import mode_coverage
from cli.command import cli_main
from datamodules import DigitsDataModule, GaussianMixtureDataModule
from lightning_modules import NonFiniteError
from lightning_modules.sinkhorn_generator import SinkhornGenerator
from transport.entropic import blur_to_eps, transport_loss

ot = pytest.importorskip("ot")

ROOT = Path(__file__).resolve().parents[1]
COSTS = ("l2sq", "l2")
OBJECTIVES = ("entropic", "sinkhorn_divergence")

pytestmark = pytest.mark.usefixtures("one_thread")  # problems this small run faster on one thread


# ---- the loss against POT ----------------------------------------------------------------------


def _reference_cost_matrix(x: np.ndarray, y: np.ndarray, cost: str, floor: float = 0.0) -> np.ndarray:
    """|x - y|^2 or max(|x - y|, floor) by broadcasting, without geomloss's or POT's formulas."""
    sq = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return sq if cost == "l2sq" else np.maximum(np.sqrt(sq), floor)


def _reference_entropic(x: np.ndarray, y: np.ndarray, cost: str, eps: float, floor: float = 0.0) -> float:
    """OT_eps = <pi, C> + eps KL(pi || a x b) with POT's log-domain Sinkhorn plan (float64).

    POT regularises with eps <pi, log pi>, which differs from eps KL(pi || a x b) by a constant on
    the couplings of (a, b): the same plan. `ot.sinkhorn2` returns <pi, C> without the entropy,
    checked here, so the KL term is added to it."""
    a, b = ot.unif(len(x)), ot.unif(len(y))
    C = _reference_cost_matrix(x, y, cost, floor)
    kw = dict(method="sinkhorn_log", stopThr=1e-12, numItermax=100_000)
    plan = ot.sinkhorn(a, b, C, eps, **kw)
    linear = float(ot.sinkhorn2(a, b, C, eps, **kw))
    assert linear == pytest.approx(float((plan * C).sum()), rel=1e-10)
    positive = plan > 0
    kl = float((plan[positive] * np.log(plan[positive] / np.outer(a, b)[positive])).sum())
    return linear + eps * kl


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_matches_pot_at_the_same_temperature(cost, objective):
    """geomloss's p=2 cost is |x-y|^2 / 2 at eps = blur^2: the module's l2sq value is twice it, at
    eps = 2 blur^2 on |x-y|^2. A factor 2 in the value or the temperature would fail here.

    geomloss's p=1 cost is sqrt(max(|x-y|^2, 1e-8)): a point's distance to itself is 1e-4, which
    moves the self-terms OT_eps(x, x), OT_eps(y, y) of the debiased divergence by about 4e-5
    relative here; the reference uses the same floor (and without it differs by < 1e-4)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(15, 3, generator=g, dtype=torch.float64) + 0.4
    blur = 1.0
    eps = blur_to_eps(blur, cost)
    assert eps == (2 * blur**2 if cost == "l2sq" else blur)
    value = transport_loss(x, y, cost, blur, objective, scaling=0.99).item()  # eps-scaling close to converged
    xn, yn = x.numpy(), y.numpy()
    floor = 1e-4 if cost == "l2" else 0.0
    reference = _reference_entropic(xn, yn, cost, eps, floor)
    if objective == "sinkhorn_divergence":
        self_terms = _reference_entropic(xn, xn, cost, eps, floor) + _reference_entropic(yn, yn, cost, eps, floor)
        reference -= self_terms / 2
    print(f"{cost} {objective}: geomloss {value:.8f}, POT reference {reference:.8f}")
    assert value == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("cost", COSTS)
def test_entropic_objective_bounds_exact_transport_and_the_divergence_does_not(cost):
    """OT_eps >= W_c (exact, POT's network simplex) at any blur. The Sinkhorn divergence of two
    clouds with the same mean and different spreads is far below W_c at a large blur."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = 0.3 * torch.randn(40, 2, generator=g, dtype=torch.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    exact = ot.emd2(ot.unif(40), ot.unif(40), _reference_cost_matrix(x.numpy(), y.numpy(), cost))
    for blur in (0.05, 0.3, 3.0):
        entropic = transport_loss(x, y, cost, blur, "entropic", scaling=0.95).item()
        assert entropic >= exact * (1 - 1e-6), (blur, entropic, exact)
    divergence = transport_loss(x, y, cost, 10.0, "sinkhorn_divergence", scaling=0.95).item()
    print(f"{cost}: W_c {exact:.4f}, OT_eps at blur 3: {entropic:.4f}, "
          f"Sinkhorn divergence at blur 10: {divergence:.4f}")
    assert divergence < 0.5 * exact


# ---- the gradient against finite differences ---------------------------------------------------


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_matches_finite_differences(cost, objective):
    """d loss / d y (geomloss's envelope gradient) against central differences of the same loss
    along random directions, float64, on a problem solved accurately (scaling 0.995)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y0 = torch.randn(7, 2, generator=g, dtype=torch.float64) + 0.5

    def loss(y):
        return transport_loss(x, y, cost, 1.0, objective, scaling=0.995)

    y = y0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(y), y)
    h = 1e-5
    for _ in range(3):
        v = torch.randn(y0.shape, generator=g, dtype=torch.float64)
        v /= v.norm()
        finite = ((loss(y0 + h * v) - loss(y0 - h * v)) / (2 * h)).item()
        analytic = (grad * v).sum().item()
        assert analytic == pytest.approx(finite, abs=5e-3 * grad.norm().item()), (analytic, finite)
    # and one coordinate at a time for the first point, so a per-point scale error cannot hide
    for d in range(2):
        e = torch.zeros_like(y0)
        e[0, d] = h
        finite = ((loss(y0 + e) - loss(y0 - e)) / (2 * h)).item()
        assert grad[0, d].item() == pytest.approx(finite, abs=5e-3 * grad.norm().item())


def test_loss_leaves_the_grad_mode_alone():
    """geomloss 0.3.1 switches gradients on at the end of its solve, even under no_grad."""
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    with torch.no_grad():
        transport_loss(x, y)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_images_are_flattened_to_vectors():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    flat = transport_loss(x.flatten(1), y.flatten(1), "l2sq", 0.5)
    torch.testing.assert_close(transport_loss(x, y, "l2sq", 0.5), flat)


# ---- the module: logs, bracket, matching -------------------------------------------------------


@pytest.mark.parametrize("objective, key, bound", [("entropic", "ot_entropic", 1.0),
                                                   ("sinkhorn_divergence", "sinkhorn_divergence", 0.0)])
def test_fast_dev_run_logs_the_objective_under_its_honest_name(objective, key, bound, quiet_trainer):
    """The module logs its objective and whether it bounds W_c, nothing else: the bracket on W_c
    is SinkhornBoundCallback's (see the next test)."""
    model = SinkhornGenerator(data_shape=(1, 8, 8), latent_dim=4, width=8, objective=objective, blur=0.5)
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics[f"train/{key}"]) and torch.isfinite(metrics[f"val/{key}"])
    other = "sinkhorn_divergence" if key == "ot_entropic" else "ot_entropic"
    assert f"train/{other}" not in metrics and f"val/{other}" not in metrics
    assert metrics["val/objective_is_upper_bound"].item() == bound
    assert ("NOT a bound" in model.describe_objective()) == (objective == "sinkhorn_divergence")
    tested = trainer.test(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)[0]
    assert math.isfinite(tested[f"test/{key}"]) and tested["test/objective_is_upper_bound"] == bound
    logged = set(metrics) | set(tested)
    assert not [k for k in logged if "/w_" in k] and logged >= {f"val/{key}", f"test/{key}"}


@pytest.mark.parametrize("cost", COSTS)
def test_validation_bracket_contains_exact_transport_between_the_same_samples(cost, quiet_trainer):
    """SinkhornBoundCallback on the module logs the bracket between the first num_samples held-out
    points and samples drawn with its seed, in the module's cost: rebuild both and compare with
    POT's exact W_c."""
    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=512, num_val_samples=300, batch_size=128)
    model = SinkhornGenerator(data_shape=dm.dims, latent_dim=2, width=16, cost=cost)
    bound = SinkhornBoundCallback(num_samples=150, seed=5, tol=0.01, max_seconds=None)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, callbacks=[bound])
    trainer.fit(model, datamodule=dm)  # held-out points from two validation batches of 128
    assert bound.last_bracket.cost == cost
    metrics = trainer.callback_metrics
    real = torch.cat([x for x, _ in dm.val_dataloader()])[:150].double()
    fake = model.sample(150, generator=torch.Generator().manual_seed(5)).double()
    exact = ot.emd2(ot.unif(150), ot.unif(150), _reference_cost_matrix(real.numpy(), fake.numpy(), cost))
    lower, upper = metrics["val/w_lower"].item(), metrics["val/w_upper"].item()
    print(f"{cost}: {lower:.5f} <= exact {exact:.5f} <= {upper:.5f}")
    assert lower <= exact * (1 + 1e-5) and exact <= upper * (1 + 1e-5)  # logged as float32
    assert metrics["val/w_num_samples"].item() == 150
    assert upper - lower <= 0.02 * upper  # tol = 0.01, float32 rounding aside


def test_transport_batch_takes_the_first_points_of_a_larger_batch_and_refuses_a_smaller_one(quiet_trainer):
    model = SinkhornGenerator(data_shape=(2,), latent_dim=2, width=8, transport_batch_size=32)
    batch = torch.randn(64, 2)
    assert torch.equal(model.transport_batch(batch, 0), batch[:32])
    with pytest.raises(ValueError, match=r"batch_size to at least 32"):
        model.transport_batch(batch[:20], 0)
    assert torch.equal(SinkhornGenerator(data_shape=(2,), latent_dim=2).transport_batch(batch, 0), batch)

    seen = []
    model.transport_objective = lambda real, fake: (seen.append((len(real), len(fake))), fake.pow(2).mean())[1]
    dm = GaussianMixtureDataModule(num_samples=150, num_val_samples=10, batch_size=64)  # batches 64, 64, 22
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert seen == [(32, 32), (32, 32), (22, 22)]  # the short last batch is matched with 22 samples


def test_a_non_finite_loss_stops_training_before_the_weights_change(quiet_trainer):
    model = SinkhornGenerator(data_shape=(2,), latent_dim=2, width=8)
    before = [p.detach().clone() for p in model.parameters()]
    model.transport_objective = lambda real, fake: fake.sum() * float("nan")
    dm = GaussianMixtureDataModule(num_samples=128, num_val_samples=10, batch_size=64)
    with pytest.raises(NonFiniteError, match="train/ot_entropic is nan"):
        quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_final_lr_is_reached_at_the_last_step(quiet_trainer):
    model = SinkhornGenerator(data_shape=(2,), latent_dim=2, width=8, lr=1e-2, final_lr=1e-4)
    dm = GaussianMixtureDataModule(num_samples=256, num_val_samples=10, batch_size=64)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)
    with pytest.raises(ValueError, match="max_epochs"):
        quiet_trainer(max_epochs=-1, limit_val_batches=0).fit(SinkhornGenerator(data_shape=(2,), latent_dim=2,
                                                                                 final_lr=1e-4), datamodule=dm)


def test_checkpoint_round_trip(checkpoint_round_trip):
    model = SinkhornGenerator(data_shape=(1, 8, 8), latent_dim=4, width=8, cost="l2sq", objective="sinkhorn_divergence",
                              blur=0.3, transport_batch_size=16)
    loaded = checkpoint_round_trip(model)
    assert (loaded.hparams.cost, loaded.hparams.objective, loaded.eps) == ("l2sq", "sinkhorn_divergence", 2 * 0.3**2)
    assert loaded.hparams.transport_batch_size == 16


@pytest.mark.parametrize(
    "kwargs, listed",
    [(dict(cost="l1"), "l2sq, l2"), (dict(objective="wasserstein"), "entropic, sinkhorn_divergence"),
     (dict(prior="uniform"), "gaussian"), (dict(output_activation="sigmoid"), "tanh")],
)
def test_unknown_names_list_the_valid_ones(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        SinkhornGenerator(data_shape=(2,), latent_dim=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(blur=0.0), "blur"), (dict(scaling=1.0), "scaling"), (dict(transport_batch_size=0), "transport_batch_size"),
     (dict(final_lr=-1.0), "final_lr")],
)
def test_bad_numbers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinkhornGenerator(data_shape=(2,), latent_dim=2, **kwargs)


@pytest.mark.parametrize("kwargs, message", [(dict(num_samples=0), "num_samples"), (dict(tol=0.0), "tol"),
                                             (dict(max_seconds=0.0), "max_seconds")])
def test_bad_numbers_of_the_bracket_are_refused_by_its_callback(kwargs, message):
    """The bracket's settings (once the module's val_num_samples, val_tol, val_max_seconds)."""
    with pytest.raises(ValueError, match=message):
        SinkhornBoundCallback(**kwargs)


# ---- the ring of 8 Gaussians: every mode, and a certified bound 5x below the untrained one ------


def test_ring_training_covers_every_mode_and_lowers_the_certified_bound(quiet_trainer):
    """400 steps (batches of 256, l2 cost, lr 3e-3 decaying to 1e-4) on the ring (radius 2, std
    0.02): about 5 s of CPU for training and 2 s per bracket; no time budget on the brackets, so the
    bounds do not depend on the machine's load. benchmarks/sinkhorn_generator_ring.py runs the
    config's longer budget over seeds."""
    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=10240, num_val_samples=1000, batch_size=256)
    model = SinkhornGenerator(data_shape=dm.dims, latent_dim=2, width=256, cost="l2", blur=0.05, lr=3e-3,
                              final_lr=1e-4)
    untrained = copy.deepcopy(model)  # same architecture and seed
    quiet_trainer(max_epochs=10, limit_val_batches=0).fit(model, datamodule=dm)
    samples = model.sample(2500, generator=torch.Generator().manual_seed(1))
    coverage = mode_coverage(samples, dm.centers, dm.std)
    upper = {}
    for name, m in [("trained", model), ("untrained", untrained)]:
        bound = SinkhornBoundCallback(num_samples=1000, tol=0.05, max_seconds=None)
        metrics = quiet_trainer(callbacks=[bound]).validate(m, datamodule=dm, verbose=False)[0]
        upper[name] = metrics["val/w_upper"]
        assert metrics["val/w_lower"] <= metrics["val/w_upper"] and metrics["val/w_num_samples"] == 1000
    ratio = upper["untrained"] / upper["trained"]
    print(f"modes covered {coverage.num_covered}/8 (high-quality fraction {coverage.high_quality_fraction:.3f}); "
          f"certified W_l2 upper bound to held-out data: trained {upper['trained']:.4f}, untrained "
          f"{upper['untrained']:.4f}, ratio {ratio:.1f}")
    assert coverage.num_covered == 8
    assert ratio >= 5.0


# ---- the configs through the command line -------------------------------------------------------


@pytest.mark.usefixtures("in_tmp_dir")  # the configs write runs/ below the working directory
def test_sinkhorn_digits_config_writes_samples_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    cli_main(["fit", "--config", str(ROOT / "configs" / "sinkhorn_digits.yaml"), "--trainer.max_epochs", "2",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
              "--model.init_args.width", "16", "--data.init_args.batch_size", "64",  # smaller, same code
              "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)])
    printed = capsys.readouterr().out
    assert "fit finished: epoch 2" in printed and "val/w_upper" in printed and "train/ot_entropic" in printed
    run_dir = out / "sinkhorn_digits" / "version_0"
    assert (run_dir / "images" / "samples_epoch=0001.png").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    model = SinkhornGenerator.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert model.hparams.objective == "entropic" and model.sample(3).shape == (3, 1, 8, 8)
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("in_tmp_dir")
def test_sinkhorn_gaussians_config_logs_modes_and_the_bracket():
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "sinkhorn_gaussians.yaml"), "--trainer.fast_dev_run", "true"])
    assert cli.model.data_shape == (2,) and cli.model.hparams.cost == "l2"
    metrics = cli.trainer.callback_metrics
    assert 0 <= metrics["val/modes_covered"].item() <= 8
    assert math.isfinite(metrics["val/w_upper"].item()) and metrics["val/w_lower"] <= metrics["val/w_upper"]
