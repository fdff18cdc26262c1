"""Commands a user runs by hand, outside the DVC pipeline: `python -m commands.predict` (classify photos with the
trained model) and `python -m commands.compare` (every experiment side by side). Below: the argument types both
parse with, so a bad number is refused by argparse, before any work, in the same words.
"""

from __future__ import annotations

import argparse


def int_at_least(lowest: int, unit: str = ""):
    """An argparse type: a whole number (of `unit`) not below `lowest`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number{f' of {unit}' if unit else ''} (got "
                                             f"{text!r})") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be {lowest} or more (got {value})")
        return value
    return parse
