"""`python -m bbsmall_jax` runs the `bbsmall` command."""

import sys

from .cli import main

sys.exit(main())
