"""Score the samples of trained MNIST checkpoints the way the MNIST quality table does.

For each checkpoint (a `last.ckpt` of `python train.py fit --config configs/*_mnist.yaml`), the model
class is read from the checkpoint, `--num-samples` samples are drawn in eval mode (fixed latent
seed) and scored against the 10000 MNIST test images with the shipped MNIST classifier
(callbacks/weights/; `benchmarks.quality_runs.image_scores`): domain FID (its 64 features, what
`FIDCallback(feature_extractor="domain")` logs as val/fid_mnist; not Inception FID), its mean
confidence (max softmax; about 0.99 on real test images) and the class balance (entropy of the
predicted classes over log 10).

    python -m benchmarks.score_mnist runs/wae_mnist/version_0/checkpoints/last.ckpt ... --data-dir ../shared/data

Prints a Markdown table (one row per checkpoint); writes nothing.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks import common
from benchmarks.quality_runs import (default_mnist_dir, feature_fit, image_scores, import_class, mnist_tensors,
                                     shipped_classifier)


def load_model(path: str) -> Any:
    """The LightningModule saved in `path`, of the class recorded in it, in eval mode on the CPU."""
    import torch

    hyperparameters = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    class_path = hyperparameters.get("_class_path")
    if not class_path:
        raise SystemExit(f"{path}: no model class recorded in the checkpoint (was it written by train.py?)")
    return import_class(class_path).load_from_checkpoint(path, map_location="cpu").eval()


def score(path: str, test_fit: tuple[Any, Any], net: Any, num_samples: int) -> dict[str, Any]:
    import torch

    model = load_model(path)
    generator = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        samples = torch.cat([model.sample(min(500, num_samples - i), generator=generator)
                             for i in range(0, num_samples, 500)])  # (num_samples, 1, 28, 28)
    return {"checkpoint": path, "model": type(model).__name__, **image_scores(samples, test_fit, net)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: data/, else ../shared/data)")
    parser.add_argument("--num-samples", type=int, default=5000)
    args = parser.parse_args()
    common.quiet_worker(common.THREADS)
    data_dir = args.data_dir or default_mnist_dir()
    if not os.path.isdir(os.path.join(data_dir, "MNIST", "raw")):
        parser.error(f"no MNIST in {os.path.abspath(data_dir)}/MNIST/raw: pass --data-dir")
    net = shipped_classifier("mnist", (1, 28, 28))
    test_fit = feature_fit(mnist_tensors(data_dir)["test"], net)  # once for every checkpoint
    rows = [score(path, test_fit, net, args.num_samples) for path in args.checkpoints]
    print(common.markdown_table(["checkpoint", "model", "domain FID vs test", "confidence", "class balance"],
                                [[r["checkpoint"], r["model"], common.fmt(r["fid"], ".1f"), common.fmt(r["confidence"], ".3f"),
                                  common.fmt(r["balance"], ".3f")] for r in rows]))


if __name__ == "__main__":
    main()
