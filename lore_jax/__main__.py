"""``python -m lore_jax``: the ``lore-jax`` command (see :mod:`lore_jax.cli`)."""

import sys

from lore_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
