"""What the two plot commands share: matplotlib as an optional dependency, saving, the CLI shape.

`python -m mlx_lm_optiq.weights.plot` and `python -m mlx_lm_optiq.kv.plot` read one of our
files, draw it and write a PNG; matplotlib is only needed for them (extra `plot`), so it is
imported at first use with an install hint, and a bad input file is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlx_lm_optiq.core.jsonio import OptiqFileError


def import_pyplot(prog: str) -> Any:
    """matplotlib.pyplot on the Agg backend, or an ImportError saying how `prog` gets it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            f"{prog} needs matplotlib, which is not installed: "
            "pip install 'mlx-lm-optiq[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def save_figure(fig: Any, output: str | Path, prog: str) -> Path:
    """Write `fig` as a PNG at `output` (its folder is created) and close it."""
    plt = import_pyplot(prog)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    input_help: str,
    read: Callable[[str], Any],
    plot: Callable[[Any, str], Path],
) -> int:
    """The plot commands' CLI: INPUT --output PNG; a file our reader rejects is `error: ...`, exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("input", metavar="INPUT", help=input_help)
    parser.add_argument("--output", required=True, help="PNG file to write (required).")
    args = parser.parse_args(argv)
    try:
        data = read(args.input)
    except OptiqFileError as e:  # missing, malformed or invalid: the message names file and field
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {plot(data, args.output)}")
    return 0
