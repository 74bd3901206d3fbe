"""Train, validate and test the project's models from the command line.

    python train.py fit --config configs/wae_digits.yaml
    python train.py fit --config configs/wae_digits.yaml --model.init_args.latent_penalty gan
    python train.py fit --config configs/wae_digits.yaml --ckpt_path last      # resume the newest run
    python train.py fit --config configs/wae_digits.yaml --trainer.devices 2 --trainer.strategy ddp
    python train.py fit --help

The same command is installed as `primal-dual` (`primal-dual fit --config ...`). What the CLI adds
to Lightning's is described in `cli/command.py`.
"""

import sys

from cli import cli_main, main  # noqa: F401  (cli_main: the tests' entry point)

if __name__ == "__main__":
    sys.exit(main())
