"""Train or fine-tune BlenderbotSmall: `python train.py --config configs/tiny.yaml --output-dir runs/tiny`."""

import sys

from bbsmall_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
