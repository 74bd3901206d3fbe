"""Train the FID feature networks that ship with the package (callbacks/weights/) and record their
SHA-256 (callbacks/weights/SHA256SUMS): run once, by a maintainer, when the network or its training
changes; `callbacks.features.load_shipped_features` checks the hash at every load.

    python -m callbacks.train_features digits
    python -m callbacks.train_features mnist --data-dir ../shared/data
"""

from __future__ import annotations

import hashlib
import os

import torch

from callbacks.features import SHIPPED_HASHES, SHIPPED_TRAINING, save_domain_features, shipped_features_path, train_domain_features


def main() -> None:
    """Train a shipped feature network and record its hash: python -m callbacks.train_features digits|mnist."""
    import argparse

    from datamodules import DigitsDataModule, MNISTDataModule

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("name", choices=sorted(SHIPPED_TRAINING))
    parser.add_argument("--data-dir", default="data", help="the folder that holds MNIST/raw (mnist only)")
    args = parser.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    dm = DigitsDataModule() if args.name == "digits" else MNISTDataModule(data_dir=args.data_dir)
    dm.setup("fit")
    net, accuracy = train_domain_features(dm, steps=SHIPPED_TRAINING[args.name], seed=0)
    path = shipped_features_path(args.name, tuple(dm.dims))
    save_domain_features(net, path, accuracy)
    hashes = {}
    if os.path.exists(SHIPPED_HASHES):
        with open(SHIPPED_HASHES) as handle:
            hashes = dict(line.split()[::-1] for line in handle if line.strip())
    hashes[os.path.basename(path)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with open(SHIPPED_HASHES, "w") as handle:
        handle.writelines(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))
    print(f"{path}: validation accuracy {accuracy:.4f}, sha256 {hashes[os.path.basename(path)]}")


if __name__ == "__main__":
    main()
