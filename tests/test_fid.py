"""FID (SPEC 6): the Frechet distance against closed forms and scipy, the callback's protocol,
real statistics cached once per run, the domain extractor's ranking of image quality on the
digits, and the offline Inception error. No network: Inception's download is monkeypatched."""

from __future__ import annotations

import functools
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.functional import gaussian_blur

from callbacks import FIDCallback
from callbacks.features import DomainFeatureNet, datamodule_feature_name, load_or_train_domain_features
from callbacks.fid import FrechetFeatureDistance, frechet_distance
from datamodules import DigitsDataModule
from helpers import TrivialModule, one_torch_thread

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def quiet_trainer(quiet_trainer):
    """The shared quiet Trainer with two training batches per epoch: the modules here only sample."""
    return functools.partial(quiet_trainer, limit_train_batches=2)


def _reference_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """FD of the Gaussian fits of samples x, y (n, d) with numpy's cov and scipy's general sqrtm."""
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return _reference_frechet_params(mu1, s1, mu2, s2)


def _reference_frechet_params(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Flatten(nn.Module):
    """Identity-like feature extractor: (B, ...) -> (B, d), recording every batch it sees."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.flatten(1)


class SampleOnly(TrivialModule):
    """Nothing but `sample(n)` and the minimum a Trainer needs; records what it generated."""

    def __init__(self, shape=(1, 8, 8), mean=None, std=None) -> None:
        super().__init__()
        self.shape = shape
        self.generator = nn.Linear(4, int(np.prod(shape)))
        self.mean, self.std = mean, std  # Gaussian samples N(mean, diag(std^2)) when given
        self.samples: list[torch.Tensor] = []

    def sample(self, num_samples):
        if self.mean is not None:
            out = self.mean + self.std * torch.randn(num_samples, len(self.mean))
        else:
            out = torch.tanh(self.generator(torch.randn(num_samples, 4))).view(num_samples, *self.shape)
        self.samples.append(out.detach().clone())
        return out


class NoSample(SampleOnly):
    sample = None


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def domain_path(tmp_path_factory, digits):
    """The digits feature extractor, trained once for this file (300 steps: ~3 s on one thread).

    One thread: the 8x8 convolutions gain nothing from two, and on cores shared with other jobs
    two threads waiting on each other made the same training 10-30x slower.
    """
    path = str(tmp_path_factory.mktemp("fid") / "fid_features_digits.pt")
    with one_torch_thread():
        load_or_train_domain_features(digits, path, steps=300)
    return path


# ---- the pure Frechet distance -----------------------------------------------------------

def test_frechet_distance_closed_form_for_commuting_covariances():
    # Diagonal covariances commute: FD = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]  # same rotation: still commuting
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    assert frechet_distance(mu1, torch.diag(a), mu1, torch.diag(a)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d", [3, 40])
def test_frechet_distance_matches_scipy_sqrtm_on_random_spd(d):
    g = torch.Generator().manual_seed(d)
    a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T / d + 1e-3 * torch.eye(d, dtype=torch.float64), b @ b.T / d
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    expected = _reference_frechet_params(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert frechet_distance(mu1, s1, mu2, s2).item() == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))


# ---- the callback with an identity-like extractor --------------------------------------

def test_callback_matches_closed_form_on_gaussians_and_scipy_on_the_same_samples(quiet_trainer):
    # Real ~ N(0, diag(a)), generated ~ N(m, diag(b)); n = 20000 per side. Over 200 seeds the
    # estimate had std 0.028 and bias 0.002 around the truth 2.058, so 0.15 is ~5 sigma.
    n, a, b = 20000, torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 1.0, 0.25])
    mean = torch.tensor([1.0, -0.5, 0.0, 0.5])
    truth = (mean.square().sum() + (a.sqrt() - b.sqrt()).square().sum()).item()
    real = a.sqrt() * torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(real, torch.zeros(n, dtype=torch.long)), batch_size=2500)
    model = SampleOnly(mean=mean, std=b.sqrt())
    fid = FIDCallback(feature_extractor=Flatten(4), num_samples=n, batch_size=3000)
    trainer = quiet_trainer(max_epochs=1, callbacks=[fid])
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    value = trainer.callback_metrics["val/fid_custom"].item()
    fake = torch.cat(model.samples)
    assert fake.shape == (n, 4) and [len(s) for s in model.samples] == [3000] * 6 + [2000]
    print(f"Gaussian FID: callback {fid.last_value:.5f}, truth {truth:.5f}")
    assert fid.last_value == pytest.approx(truth, abs=0.15)
    assert fid.last_value == pytest.approx(_reference_frechet(real.double().numpy(), fake.double().numpy()), rel=1e-8)
    assert value == pytest.approx(fid.last_value, rel=1e-6)  # logged as float32


def _run_recording(quiet_trainer, digits, epochs=3, num_samples=150):
    extractor = Flatten(64)
    model = SampleOnly()
    fid = FIDCallback(feature_extractor=extractor, num_samples=num_samples, batch_size=64)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[fid])
    trainer.fit(model, datamodule=digits)
    return extractor, model, fid, trainer


def test_real_statistics_are_computed_once_per_run(digits, quiet_trainer):
    extractor, model, fid, _ = _run_recording(quiet_trainer, digits, epochs=3)
    n_fake_calls = len(model.samples)  # 150 = 64 + 64 + 22 per epoch: 3 calls
    real_calls = len(extractor.seen) - n_fake_calls
    assert n_fake_calls == 9 and real_calls == 3  # val batches 64 + 64 + 22 in epoch 0 only
    assert int(fid.metric.real_features_num_samples) == 150


def test_custom_extractor_gets_the_images_exactly_as_given(digits, quiet_trainer):
    extractor, model, fid, _ = _run_recording(quiet_trainer, digits, epochs=1)
    val = torch.cat([x for x, _ in digits.val_dataloader()])[:150]
    seen_real, seen_fake = torch.cat(extractor.seen[:3]), torch.cat(extractor.seen[3:])
    assert seen_real.dtype == torch.float32 and torch.equal(seen_real, val)  # no uint8, no rescaling
    assert torch.equal(seen_fake, torch.cat(model.samples))


def test_sanity_check_and_off_epochs_are_skipped(digits, quiet_trainer):
    extractor = Flatten(64)
    fid = FIDCallback(feature_extractor=extractor, num_samples=64, every_n_epochs=2)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=2, callbacks=[fid])
    trainer.fit(SampleOnly(), datamodule=digits)
    assert len(extractor.seen) == 2  # epoch 1 only: one real batch, one generated batch


def test_metric_keeps_real_statistics_across_reset():
    metric = FrechetFeatureDistance(Flatten(2))
    metric.update(torch.randn(10, 2), real=True)
    metric.update(torch.randn(10, 2), real=False)
    metric.reset()
    assert int(metric.real_features_num_samples) == 10 and int(metric.fake_features_num_samples) == 0
    with pytest.raises(TypeError, match="num_features"):
        FrechetFeatureDistance(nn.Identity())


# ---- the protocol and the domain extractor ----------------------------------------------

def test_module_with_only_sample_gets_fid_logged(digits, domain_path, quiet_trainer):
    fid = FIDCallback(feature_extractor="domain", num_samples=200, feature_path=domain_path)
    trainer = quiet_trainer(max_epochs=2, callbacks=[fid])
    trainer.fit(SampleOnly(), datamodule=digits)
    assert fid.key == "val/fid_digits" and "val/fid_inception" not in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["val/fid_digits"]) and fid.last_value > 0


def test_module_without_sample_gets_a_clear_type_error(digits, quiet_trainer):
    trainer = quiet_trainer(max_epochs=1, callbacks=[FIDCallback(feature_extractor=Flatten(64))])
    with pytest.raises(TypeError, match=r"FIDCallback needs .*sample\(num_samples\)"):
        trainer.fit(NoSample(), datamodule=digits)


def test_domain_extractor_needs_a_labelled_datamodule(quiet_trainer):
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = quiet_trainer(max_epochs=1, callbacks=[FIDCallback(feature_extractor="domain")])
    with pytest.raises(ValueError, match="num_classes"):
        trainer.fit(SampleOnly(), train_dataloaders=loader, val_dataloaders=loader)


def test_domain_extractor_is_reused_and_retrained_only_for_other_data(digits, domain_path, monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the file matches")

    import callbacks.features as features

    with monkeypatch.context() as m:
        m.setattr(features, "train_domain_features", no_training)
        net = load_or_train_domain_features(digits, domain_path)
    assert isinstance(net, DomainFeatureNet) and net.num_features == 64 and net.feature_name == "digits"
    path = str(tmp_path / "f.pt")
    load_or_train_domain_features(digits, path, steps=2)
    big = DigitsDataModule(image_size=12, batch_size=64)
    big.setup("fit")
    with pytest.warns(UserWarning, match="other data"):
        net = load_or_train_domain_features(big, path, steps=2)
    assert net.dims == (1, 12, 12)
    assert datamodule_feature_name(digits) == "digits"
    assert datamodule_feature_name(type("MNISTDataModule", (), {})()) == "mnist"


def test_domain_fid_ranks_image_quality_on_digits(digits, domain_path):
    net = load_or_train_domain_features(digits, domain_path)
    train = torch.cat([x for x, _ in digits.train_dataloader()])
    held_out = torch.cat([x for x, _ in digits.val_dataloader()] + [x for x, _ in digits.test_dataloader()])

    def fid(fake):
        metric = FrechetFeatureDistance(net)
        metric.update(train, real=True)
        metric.update(fake, real=False)
        return metric.compute().item()

    noise = torch.rand(held_out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    held, uniform, blurred = fid(held_out), fid(noise), fid(gaussian_blur(held_out, kernel_size=3, sigma=1.0))
    print(f"digits FID vs training images: held-out {held:.1f}, uniform noise {uniform:.1f}, blurred {blurred:.1f}")
    assert 10 * held < blurred and 10 * held < uniform


# ---- the feature networks shipped with the package -----------------------------------------

def test_digits_and_mnist_use_the_shipped_networks(tmp_path, monkeypatch):
    """No training and no cache file: the package's network, checked against its recorded SHA-256,
    is a classifier of the digits (accuracy on the held-out digits well above chance)."""
    import callbacks.features as features

    digits = DigitsDataModule()
    digits.setup("fit")
    net = features.load_shipped_features("digits", (1, 8, 8), 10)
    x, y = map(torch.cat, zip(*digits.val_dataloader()))
    with torch.no_grad():
        accuracy = (net.classify(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9 and net.num_features == 64 and features.load_shipped_features("mnist", (1, 28, 28), 10) is not None
    assert features.load_shipped_features("digits", (1, 16, 16), 10) is None  # other sizes train their own

    damaged = tmp_path / "weights"
    damaged.mkdir()
    for name in ("fid_digits_1x8x8.pt", "SHA256SUMS"):
        (damaged / name).write_bytes((Path(features.SHIPPED) / name).read_bytes())
    with open(damaged / "fid_digits_1x8x8.pt", "ab") as handle:
        handle.write(b"x")
    monkeypatch.setattr(features, "SHIPPED", str(damaged))
    monkeypatch.setattr(features, "SHIPPED_HASHES", str(damaged / "SHA256SUMS"))
    with pytest.raises(ValueError, match="does not match its SHA-256.*python -m callbacks.train_features digits"):
        features.load_shipped_features("digits", (1, 8, 8), 10)


# ---- Inception: image adaptation and the offline error -----------------------------------

def test_inception_features_adapt_grey_images_in_minus_one_one():
    pytest.importorskip("torch_fidelity")
    from callbacks.inception import InceptionFeatures

    recorder = Flatten(2048)
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 2)
    InceptionFeatures(recorder)(x)
    seen = recorder.seen[0]
    assert seen.dtype == torch.uint8 and seen.shape == (1, 3, 2, 2)
    assert seen[0, 0].flatten().tolist() == [0, 128, 255, 191] and torch.equal(seen[0, 0], seen[0, 2])


def test_inception_offline_error_names_the_file_and_both_remedies(monkeypatch, tmp_path, quiet_trainer):
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from callbacks.inception import WEIGHTS_FILE, cached_weights_path

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as info:
        FIDCallback(feature_extractor="inception").setup(quiet_trainer(), SampleOnly(), "fit")
    message = str(info.value)
    print(message)
    assert WEIGHTS_FILE in message and cached_weights_path() in message and str(tmp_path) in message
    assert "inception_weights_path" in message and "feature_extractor_weights_path" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        FIDCallback(feature_extractor="inception", inception_weights_path=str(tmp_path / "nowhere.pth")).setup(
            quiet_trainer(), SampleOnly(), "fit"
        )


def test_inception_reads_a_local_weights_file_offline(monkeypatch, tmp_path, quiet_trainer):
    """FIDCallback(inception_weights_path=FILE) hands FILE to torch-fidelity's InceptionV3 and never
    downloads: a tiny stand-in file (not the 90 MB network) is what its state dict is read from."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    stand_in = tmp_path / "inception-stand-in.pth"
    torch.save({"stand_in": torch.tensor([42.0])}, stand_in)
    loaded = []

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: loaded.append(state))
    callback = FIDCallback(feature_extractor="inception", inception_weights_path=str(stand_in))
    callback.setup(quiet_trainer(), SampleOnly(), "fit")
    assert callback.key == "val/fid_inception" and len(loaded) == 1 and loaded[0]["stand_in"].item() == 42.0


def test_inception_needs_torch_fidelity(monkeypatch):
    import sys

    from callbacks.inception import load_inception

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        load_inception()
