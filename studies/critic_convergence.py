"""How close a certified Lipschitz critic gets to W_l2 on FIXED samples, against critic steps (docs/theory.md 4.3, 4.4).

The dual side of the primal-dual link at large lambda is Kantorovich-Rubinstein: for kl (g_f the
identity) GAN_{lambda f}(P_X, P_G; H_c) -> sup_{Lip(h) <= 1} E_P[h] - E_Q[h] = W_l2(P, Q). This
script takes the generator out of the picture: P is the 2-D ring of 8 Gaussians (radius 2, std 0.1,
the chain study's), Q a "model" of it (radius 1.8, std 0.25, rotated by 0.1 rad), both fixed.
The data critic of FGAN / PrimalDual (`build_critic`, spectral norm, MaxMin by default) ascends
E_P[h] - E_Q[h] on 20,000 training points of each, batch 256, Adam(betas 0.5, 0.999). After
`steps` steps its certified value [E_P h - E_Q h] / max(1, L) on 2000 held-out points of each, L the
certified Lipschitz bound (`maths.lipschitz`), is compared with

- W_c(X, Y) exact (POT) between the same 2000 + 2000 held-out points, the chain table's reference;
- W_c at 8000 + 8000 fresh points, nearer the population value (the sample value is biased upwards).

A certified value can never exceed the population W_l2; it may exceed a sample W only by chance.

    python -m studies.critic_convergence --quick     # 1000 / 3000 / 10000 steps, lr 2e-4
    python -m studies.critic_convergence             # up to 30000 steps, lr 2e-4 and 1e-3

Writes studies/results/critic_convergence[_quick].csv, .json and .md; docs/STUDIES.md reads them.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks import common
from benchmarks.machine import check_quiet, describe_machine, machine_info
from studies.common import RESULTS, report_title

NAME = "critic_convergence"
NUM_TRAIN, NUM_TEST, NUM_LARGE, BATCH = 20_000, 2000, 8000, 256


def ring(n: int, generator: torch.Generator, radius: float = 2.0, std: float = 0.1, rotation: float = 0.0) -> torch.Tensor:
    """n points of the ring of 8 Gaussians (the datamodule's mixture), turned by `rotation`, (n, 2) float64."""
    from datamodules.toy2d import mixture_centers, sample_mixture

    c, s = math.cos(rotation), math.sin(rotation)
    centres = mixture_centers("ring", 8, radius).double() @ torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    return sample_mixture(centres, std, n, generator).tensors[0].double()


def model_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    return ring(n, generator, radius=1.8, std=0.25, rotation=0.1)


def train_critic(x: torch.Tensor, y: torch.Tensor, checkpoints: list[int], lr: float, depth: int, width: int,
                 activation: str, seed: int):
    """Yield (steps, critic) at each of `checkpoints` (increasing) of one training run."""
    from lightning_modules.networks import build_critic

    torch.manual_seed(seed)
    critic = build_critic((2,), width, depth=depth, spectral_norm=True, activation=activation)
    optimiser = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.999))
    step = 0
    for target in checkpoints:
        critic.train()
        while step < target:
            i, j = torch.randint(len(x), (BATCH,)), torch.randint(len(y), (BATCH,))
            loss = critic(y[j]).mean() - critic(x[i]).mean()  # descend -(E_P h - E_Q h)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
        yield step, critic


def certified_value(critic: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """([E_x h - E_y h] / max(1, L), L) in float64 on a copy of the critic."""
    import copy

    from maths.lipschitz import lipschitz_upper_bound

    c = copy.deepcopy(critic).double().eval()
    with torch.no_grad():
        bound = lipschitz_upper_bound(c, (2,))
        return float(c(x).mean() - c(y).mean()) / max(1.0, bound), bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lr 2e-4 only, up to 10000 steps")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (the configs' critic_depth)")
    parser.add_argument("--width", type=int, default=128, help="hidden width (the 2-D config's critic_width)")
    parser.add_argument("--activation", choices=["maxmin", "leaky_relu"], default="maxmin")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    common.set_torch_threads(1)
    from transport import exact_wasserstein

    start = time.time()
    machine = machine_info()
    quiet = check_quiet()  # other processes' CPU use, sampled before the run
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = ring(NUM_TRAIN, generator).float(), model_samples(NUM_TRAIN, generator).float()
    x_test, y_test = ring(NUM_TEST, generator), model_samples(NUM_TEST, generator)
    w_test = exact_wasserstein(x_test, y_test, "l2")
    w_large = exact_wasserstein(ring(NUM_LARGE, generator), model_samples(NUM_LARGE, generator), "l2")
    print(f"W_l2 exact: {w_test:.4f} between the {NUM_TEST} + {NUM_TEST} held-out points, {w_large:.4f} at "
          f"{NUM_LARGE} + {NUM_LARGE} fresh points", flush=True)

    checkpoints = [1000, 3000, 10000] if args.quick else [1000, 3000, 10000, 30000]
    rates = [2e-4] if args.quick else [2e-4, 1e-3]
    rows = []
    for lr in rates:
        run_start = time.time()
        for steps, critic in train_critic(x_train, y_train, checkpoints, lr, args.depth, args.width,
                                          args.activation, seed=0):
            value, bound = certified_value(critic, x_test, y_test)
            rows.append({"lr": lr, "steps": steps, "certified": value, "lipschitz_bound": bound,
                         "over_w_test": value / w_test, "over_w_large": value / w_large,
                         "seconds": time.time() - run_start})
            print(f"lr {lr:g}, {steps} steps: certified {value:.4f} = {value / w_test:.3f} W_c(held-out) = "
                  f"{value / w_large:.3f} W_c({NUM_LARGE}); bound {bound:.3f} ({time.time() - run_start:.0f} s)",
                  flush=True)

    table = common.markdown_table(
        ["lr", "steps", "certified value", "Lip bound", "/ W_c held-out", f"/ W_c ({NUM_LARGE} pts)", "seconds"],
        [[f"{r['lr']:g}", r["steps"], f"{r['certified']:.4f}", f"{r['lipschitz_bound']:.3f}",
          f"{r['over_w_test']:.3f}", f"{r['over_w_large']:.3f}", f"{r['seconds']:.0f}"] for r in rows])
    lines = [report_title(NAME, args.quick), "",
             f"Critic: depth {args.depth}, width {args.width}, {args.activation}, spectral norm; batch {BATCH}. "
             f"W_l2 exact: {w_test:.4f} (held-out {NUM_TEST} + {NUM_TEST}), {w_large:.4f} ({NUM_LARGE} + {NUM_LARGE}).",
             "", table, "", describe_machine(machine) + (f" ({quiet})" if quiet else ""),
             f"{time.time() - start:.0f} s wall clock."]
    print("\n" + "\n".join(lines[2:]))
    stem = common.result_stem(NAME, args.quick, args.out)
    common.write_csv(stem + ".csv", rows)
    common.write_text(stem + ".md", "\n".join(lines))
    settings = {"depth": args.depth, "width": args.width, "activation": args.activation, "batch": BATCH,
                "num_train": NUM_TRAIN, "num_test": NUM_TEST, "num_large": NUM_LARGE,
                "w_test": w_test, "w_large": w_large}
    common.write_json(stem + ".json", common.result_payload(NAME, args.quick, settings, rows, {}, machine,
                                                            time.time() - start))
    print(f"wrote {stem}.md, .csv and .json")


if __name__ == "__main__":
    main()
