"""Convert a BlenderbotSmall checkpoint into an HF-format safetensors directory (see `--help`)."""

import sys

from bbsmall_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
