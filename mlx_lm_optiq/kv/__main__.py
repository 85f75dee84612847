"""`python -m mlx_lm_optiq.kv MODEL --target-bits B`: write a per-layer KV plan (see kv/cli.py)."""

import sys

from mlx_lm_optiq.kv.cli import main

sys.exit(main())
