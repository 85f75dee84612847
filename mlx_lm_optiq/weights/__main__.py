"""`python -m mlx_lm_optiq.weights`: measure a sensitivity table (see weights/cli.py)."""

import sys

from mlx_lm_optiq.weights.cli import main

sys.exit(main())
