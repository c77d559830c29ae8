"""``python -m dualadam_hf``: the ``dualadam-hf`` command, also for ``accelerate launch -m dualadam_hf``."""

import sys

from .experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
