"""`python -m bbsmall_jax` runs the `bbsmall` command."""

from bbsmall_jax.cli.main import entry

entry()
