"""Drop-in callbacks for any LightningModule with `sample(num_samples)` (and `encode`/`decode`)."""

from callbacks.images import SampleGridCallback

__all__ = ["SampleGridCallback"]
