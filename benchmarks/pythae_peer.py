"""pythae, the peer WAE library the throughput and quality benchmarks compare with: its WAE_MMD
around the project's networks, with the settings that match the project's WAE-MMD."""

from __future__ import annotations

from typing import Any, Sequence


def import_pythae() -> Any:
    """The pythae package, or a ModuleNotFoundError that says how to install it."""
    try:
        import pythae  # noqa: F401
        from pythae.models import WAE_MMD, WAE_MMD_Config  # noqa: F401
        from pythae.trainers import BaseTrainer  # noqa: F401
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "This benchmark compares with pythae (the peer WAE library), an optional dependency: "
            'pip install -e ".[bench]" (or pip install pythae). Skip the pythae rows with --no-pythae.'
        ) from err
    import logging

    # pythae's modules attach their own INFO console handlers at import; keep its warnings only.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return pythae


def pythae_wae_mmd(encoder: Any, decoder: Any, data_shape: Sequence[int], latent_dim: int, lambda_: float) -> Any:
    """pythae's WAE_MMD around the project's encoder and decoder modules, with the settings that
    match `lightning_modules.wae.WAE(latent_penalty="mmd", kernel="imq", cost="l2sq",
    prior="gaussian")`: kernel "imq", bandwidth 1 (so C = 2 d_z, the project's base scale for a
    unit-variance prior), the WAE paper's scales (0.1 ... 10, the project's DEFAULT_KERNEL_SCALES),
    reg_weight = lambda_, reconstruction loss scale 1 (pythae's loss is the squared error summed
    over pixels, averaged over the batch: the project's l2sq cost)."""
    import_pythae()
    from pythae.models import WAE_MMD, WAE_MMD_Config
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    from maths.mmd import DEFAULT_KERNEL_SCALES

    class Encoder(BaseEncoder):
        def __init__(self, net: Any) -> None:
            BaseEncoder.__init__(self)
            self.net = net

        def forward(self, x: Any) -> Any:
            return ModelOutput(embedding=self.net(x))  # (B, d_z)

    class Decoder(BaseDecoder):
        def __init__(self, net: Any) -> None:
            BaseDecoder.__init__(self)
            self.net = net

        def forward(self, z: Any) -> Any:
            return ModelOutput(reconstruction=self.net(z))  # (B, C, H, W)

    config = WAE_MMD_Config(
        input_dim=tuple(data_shape), latent_dim=latent_dim, kernel_choice="imq", reg_weight=lambda_,
        kernel_bandwidth=1.0, scales=list(DEFAULT_KERNEL_SCALES), reconstruction_loss_scale=1.0,
    )
    return WAE_MMD(config, encoder=Encoder(encoder), decoder=Decoder(decoder))


def train_pythae_wae(model: Any, images: Any, epochs: int, batch_size: int, lr: float, betas: Sequence[float],
                     seed: int) -> Any:
    """Train a pythae model (from `pythae_wae_mmd`) on `images` (N, C, H, W) with pythae's own
    BaseTrainer (Adam(lr, betas), CPU, its output folder a temporary one); returns it in eval mode."""
    import contextlib
    import io
    import tempfile

    import torch
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    dataset = BaseDataset(images, torch.zeros(len(images)))  # labels unused
    with tempfile.TemporaryDirectory(prefix="pythae_") as out, contextlib.redirect_stderr(io.StringIO()):
        config = BaseTrainerConfig(output_dir=out, num_epochs=epochs, per_device_train_batch_size=batch_size,
                                   learning_rate=lr, optimizer_params={"betas": tuple(betas)}, no_cuda=True, seed=seed)
        trainer = BaseTrainer(model, train_dataset=dataset, training_config=config)
        trainer.train()
    return trainer.model.eval()  # the last epoch's weights, as for the other models


PYTHAE_MATCHING = [
    ("reconstruction cost", "sum over pixels of (x - G(E(x)))^2, batch mean (cost='l2sq')",
     "F.mse_loss(reduction='none').sum(-1), batch mean, reconstruction_loss_scale=1", "equal"),
    ("latent penalty", "unbiased MMD^2 U-statistic, cross term / (n m)", "the same estimator", "equal"),
    ("kernel", "IMQ summed over scales (0.1, 0.2, 0.5, 1, 2, 5, 10) x C, C = 2 d_z",
     "kernel_choice='imq', scales as ours, kernel_bandwidth=1 -> C = 2 d_z", "equal"),
    ("kernel arithmetic", "squared distances by the Gram expansion |x|^2 + |y|^2 - 2 x.y (one matmul)",
     "torch.norm of the (B, B, d_z) difference tensor, squared", "differs (same value to rounding)"),
    ("lambda", "lambda_=10", "reg_weight=10", "equal"),
    ("prior", "N(0, I) codes drawn per step", "torch.randn_like(z) per step", "equal"),
    ("networks", "the project's encoder / decoder builders", "the same modules wrapped in BaseEncoder / BaseDecoder",
     "equal"),
    ("optimiser", "Adam(lr=1e-3, betas=(0.5, 0.999)) on encoder + decoder", "the same", "equal"),
    ("batch input", "a tensor from the DataLoader", "a DatasetOutput dict (data=...) as pythae's forward needs",
     "differs (a dict per step)"),
]
