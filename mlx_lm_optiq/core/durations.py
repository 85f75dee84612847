"""How long something takes, as the one-line estimates before long work print it."""


def format_duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3.5 h`: seconds below 90 s, minutes below 90 min, else hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
