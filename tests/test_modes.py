"""Mode coverage: the vectorised count against a brute-force loop, hand-made cases, the
callback on a Gaussian mixture, and bad input."""

import math

import lightning as L
import pytest
import torch

from callbacks.modes import ModeCoverageCallback, count_covered_modes, coverage_from_counts, mode_coverage
from datamodules import DigitsDataModule
from datamodules.toy2d import GaussianMixtureDataModule, mixture_centers
from helpers import TrivialModule


def brute_force_coverage(samples, centers, std, min_fraction=0.02, num_std=3.0):
    """Per-mode counts with plain Python loops: nearest centre, then the distance test."""
    counts = [0] * len(centers)
    for x in samples.tolist():
        distances = [math.dist(x, c) for c in centers.tolist()]
        k = min(range(len(centers)), key=distances.__getitem__)
        if distances[k] <= num_std * std:
            counts[k] += 1
    n = len(samples)
    covered = sum(count / n >= min_fraction for count in counts)
    return counts, covered, sum(counts) / n


RING = mixture_centers("ring", 8, 2.0).double()  # (8, 2)


def test_a_sample_of_the_mixture_covers_every_mode_with_high_quality():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(8, (5000,), generator=g)
    noise = torch.randn(5000, 2, generator=g, dtype=torch.float64)
    x = RING[y] + 0.02 * noise
    result = mode_coverage(x, RING, 0.02)
    assert result.num_covered == 8
    # In 2-D, ||noise|| is chi with 2 degrees of freedom: P(||noise|| <= 3) = 1 - exp(-9 / 2).
    assert result.high_quality_fraction == pytest.approx(1 - math.exp(-4.5), abs=0.005)
    # The balls are far apart, so a sample is counted exactly when its own noise is small.
    inside = noise.norm(dim=1) <= 3.0
    assert result.counts.tolist() == torch.bincount(y[inside], minlength=8).tolist()


def test_hand_made_cases():
    std = 0.1  # radius 0.3
    centers = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    samples = torch.tensor(
        [[0.0, 0.0], [0.3, 0.0],  # mode 0: the centre and a point on the radius (inside: <=)
         [1.0, 0.29], [1.0, 0.31],  # mode 1: one inside, one just outside
         [5.0, 5.0], [0.5, 0.5]],  # far away; equidistant-ish point far from every ball
        dtype=torch.float64,
    )
    result = mode_coverage(samples, centers, std, min_fraction=0.2)
    assert result.counts.tolist() == [2, 1, 0]
    torch.testing.assert_close(result.fractions, torch.tensor([2 / 6, 1 / 6, 0.0], dtype=torch.float64))
    assert result.covered.tolist() == [True, False, False]  # 1/6 < 0.2
    assert result.num_covered == 1 and result.high_quality_fraction == pytest.approx(3 / 6)
    assert count_covered_modes(samples, centers, std, min_fraction=1 / 6) == 2  # the threshold is inclusive
    assert count_covered_modes(samples, centers, std, num_std=0.5, min_fraction=0.1) == 1  # radius 0.05


def test_collapsed_generator_covers_one_mode_and_nan_samples_count_as_misses():
    x = RING[3] + 0.01 * torch.randn(1000, 2, dtype=torch.float64)
    x[:100] = math.nan
    result = mode_coverage(x, RING, 0.02)
    assert result.num_covered == 1 and result.covered[3]
    assert result.high_quality_fraction == pytest.approx(0.9)


@pytest.mark.parametrize("seed, spread", [(0, 0.05), (1, 0.5), (2, 2.0)])
def test_matches_brute_force_loop(seed, spread):
    """Samples scattered around the centres at several spreads (many near the threshold), in
    float32 as a model would give them, and over several chunks."""
    g = torch.Generator().manual_seed(seed)
    centers = mixture_centers("grid", 9, 1.0)  # (9, 2), spacing 1
    y = torch.randint(9, (700,), generator=g)
    x = centers[y] + spread * torch.randn(700, 2, generator=g)
    std = 0.05
    counts, covered, high_quality = brute_force_coverage(x.double(), centers.double(), std)
    result = mode_coverage(x, centers, std, chunk_size=128)
    assert result.counts.tolist() == counts
    assert result.num_covered == covered and count_covered_modes(x, centers, std) == covered
    assert result.high_quality_fraction == pytest.approx(high_quality, abs=1e-12)
    assert result.fractions.sum().item() == pytest.approx(high_quality, abs=1e-12)


def test_nearest_centre_assignment_where_balls_overlap():
    centers = torch.tensor([[0.0], [1.0]], dtype=torch.float64)  # 1-D, radius 3 * 0.3 = 0.9 > 0.5
    samples = torch.tensor([[0.4], [0.45], [0.6]], dtype=torch.float64)
    result = mode_coverage(samples, centers, 0.3)
    assert result.counts.tolist() == [2, 1]  # every sample counted once, for its nearest centre
    assert result.high_quality_fraction == pytest.approx(1.0)


@pytest.mark.parametrize(
    "samples, centers, kwargs, message",
    [
        (torch.zeros(4, 3), RING, {}, "same D"),
        (torch.zeros(0, 2), RING, {}, "at least one sample"),
        (torch.zeros(4, 2), RING, {"std": 0.0}, "positive"),
        (torch.zeros(4, 2), RING, {"min_fraction": 1.5}, r"\[0, 1\]"),
    ],
)
def test_bad_input_is_named(samples, centers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mode_coverage(samples, centers, **{"std": 0.02, **kwargs})


# ---- the callback ------------------------------------------------------------------------------


class MixtureSampler(TrivialModule):
    """A 'model' that samples the true mixture restricted to the first `modes` centres."""

    def __init__(self, centers: torch.Tensor, std: float, modes: int) -> None:
        super().__init__()
        self.centers, self.std, self.modes = centers, std, modes

    def sample(self, num_samples: int) -> torch.Tensor:
        y = torch.randint(self.modes, (num_samples,))
        return self.centers[y] + self.std * torch.randn(num_samples, 2)


def test_callback_logs_modes_of_a_datamodule_mixture(quiet_trainer):
    L.seed_everything(0)
    dm = GaussianMixtureDataModule(num_samples=64, num_val_samples=64, batch_size=64)
    callback = ModeCoverageCallback(num_samples=4000)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(MixtureSampler(dm.centers, dm.std, modes=5), datamodule=dm)
    assert trainer.callback_metrics["val/modes_covered"].item() == 5
    assert trainer.callback_metrics["val/high_quality_fraction"].item() == pytest.approx(1 - math.exp(-4.5), abs=0.02)
    assert callback.last.covered.tolist() == [True] * 5 + [False] * 3


def test_callback_without_centres_says_what_to_pass(quiet_trainer):
    trainer = quiet_trainer(fast_dev_run=True, callbacks=[ModeCoverageCallback()])
    model = MixtureSampler(RING.float(), 0.02, modes=8)
    with pytest.raises(ValueError, match="centers=.*GaussianMixtureDataModule"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=8))


def test_callback_needs_sample(quiet_trainer):
    class NoSample(L.LightningModule):
        pass

    trainer = quiet_trainer()
    with pytest.raises(TypeError, match="sample"):
        ModeCoverageCallback(centers=RING.tolist(), std=0.02).setup(trainer, NoSample(), "fit")


def test_callback_sampling_leaves_the_training_random_stream_untouched(quiet_trainer):
    dm = GaussianMixtureDataModule(num_samples=64, num_val_samples=64, batch_size=64)
    callback = ModeCoverageCallback(num_samples=500, seed=3)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    model = MixtureSampler(dm.centers, dm.std, modes=8)
    trainer.fit(model, datamodule=dm)
    first = callback.last.counts.clone()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model.log = lambda *args, **kwargs: None  # outside the loop, where Lightning's self.log refuses
    callback.on_validation_epoch_end(trainer, model)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(callback.last.counts, first)  # the same noise at every evaluation


def test_coverage_from_counts_sums_like_one_big_sample():
    generator = torch.Generator().manual_seed(0)
    samples = RING[torch.randint(0, 3, (600,), generator=generator)] + 0.02 * torch.randn(600, 2, generator=generator, dtype=torch.float64)
    halves = [mode_coverage(part, RING, 0.02) for part in samples.split(300)]
    summed = coverage_from_counts(halves[0].counts + halves[1].counts, 600, 0.02)
    whole = mode_coverage(samples, RING, 0.02)
    assert torch.equal(summed.counts, whole.counts)
    assert summed.num_covered == whole.num_covered == 3
    assert summed.high_quality_fraction == whole.high_quality_fraction
