"""`python -m bbsmall_jax` runs the `bbsmall` command."""

import sys

from bbsmall_jax.cli.main import main

sys.exit(main())
