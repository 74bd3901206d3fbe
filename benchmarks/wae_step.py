"""The WAE-MMD training step that `benchmarks.throughput` times (docs/theory.md 3.3): its networks
(configs/wae_mnist_gpu.yaml and the variant with half the channels), synthetic 28x28 images, the loader,
the loss written with the project's functions, its FLOPs, and the check that pythae computes the
same objective."""

from __future__ import annotations

from typing import Any

from benchmarks import common
from benchmarks.pythae_peer import pythae_wae_mmd

BATCH = 100
IMAGE_SHAPE = (1, 28, 28)
LATENT_DIM = 8
LAMBDA = 10.0
LR, BETAS = 1e-3, (0.5, 0.999)


def network_variants() -> dict[str, dict[str, list[int]]]:
    """{name: {encoder_channels, decoder_channels}}: the WAE paper's MNIST networks (read from
    configs/wae_mnist_gpu.yaml) and the variant with half the channels."""
    init = common.config_parts("wae_mnist_gpu")[0]
    enc, dec = list(init["encoder_channels"]), list(init["decoder_channels"])
    return {
        "-".join(map(str, enc)): {"encoder_channels": enc, "decoder_channels": dec},
        "-".join(str(c // 2) for c in enc): {"encoder_channels": [c // 2 for c in enc],
                                              "decoder_channels": [c // 2 for c in dec]},
    }


def build_wae(channels: dict[str, list[int]], **options: Any) -> Any:
    """The project's WAE-MMD at 28x28 with the given channels (and speed `options`: channels_last,
    compile), seeded so every contender starts from the same weights."""
    import torch

    from lightning_modules.wae import WAE

    torch.manual_seed(0)
    return WAE(data_shape=IMAGE_SHAPE, latent_dim=LATENT_DIM, latent_penalty="mmd", kernel="imq", lambda_=LAMBDA,
               cost="l2sq", prior="gaussian", lr=LR, betas=BETAS, **channels, **options)


def synthetic_images(count: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.rand(count, *IMAGE_SHAPE, generator=generator) * 2.0 - 1.0  # (N, 1, 28, 28) in [-1, 1]


def make_loader(images: Any) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(images), batch_size=BATCH, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(2))


def wae_mmd_loss(encoder: Any, decoder: Any, x: Any) -> Any:
    """The WAE-MMD objective with the project's loss functions, as `WAE.training_step` computes it."""
    from maths.mmd import mmd_unbiased
    from maths.priors import sample_prior
    from transport.costs import cost

    z = encoder(x)  # (B, d_z)
    recon = cost(x, decoder(z), "l2sq").mean()
    z_prior = sample_prior("gaussian", z.shape[0], LATENT_DIM, dtype=z.dtype)  # (B, d_z)
    return recon + LAMBDA * mmd_unbiased(z, z_prior, "imq", base_scale=2.0 * LATENT_DIM)


# ---- FLOPs and the pythae check --------------------------------------------------------------


def step_flops(channels: dict[str, list[int]]) -> tuple[float, float]:
    """(FLOPs of one forward + backward of the WAE-MMD step, FLOPs of its forward), per image,
    counted by torch's FlopCounterMode (a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    wae = build_wae(channels)
    encoder, decoder = wae.encoder.train(), wae.decoder.train()
    x = synthetic_images(BATCH)
    with FlopCounterMode(display=False) as counter:
        wae_mmd_loss(encoder, decoder, x).backward()
    step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        wae_mmd_loss(encoder, decoder, x)
    return step / BATCH, counter.get_total_flops() / BATCH


def check_same_objective(channels: dict[str, list[int]]) -> dict[str, float]:
    """Relative differences between pythae's and the project's reconstruction term and MMD^2 on
    one batch with the same prior draws: the two compute the same objective (to float32 rounding)."""
    import torch
    from pythae.data.datasets import DatasetOutput

    from maths.mmd import mmd_unbiased
    from maths.priors import sample_prior
    from transport.costs import cost

    wae = build_wae(channels)
    pythae_model = pythae_wae_mmd(wae.encoder, wae.decoder, IMAGE_SHAPE, LATENT_DIM, LAMBDA)
    wae.eval()  # batch norm with running statistics: both see the same network function
    x = synthetic_images(BATCH)
    with torch.no_grad():
        z = wae.encoder(x)  # (B, d_z)
        recon = cost(x, wae.decoder(z), "l2sq").mean()
        torch.manual_seed(5)
        mmd = mmd_unbiased(z, sample_prior("gaussian", BATCH, LATENT_DIM), "imq", base_scale=2.0 * LATENT_DIM)
        torch.manual_seed(5)  # pythae draws its prior codes with randn_like(z): the same numbers
        out = pythae_model(DatasetOutput(data=x))
    return {"recon": float((out.recon_loss - recon).abs() / recon.abs()),
            "mmd": float((out.mmd_loss - mmd).abs() / mmd.abs())}
