"""Builds docs/offline-plots/template.html: the page `dvc plots show` / `dvc plots diff` fill (DVC's
`plots.html_template`, set in .dvc/config), carrying Vega, Vega-Lite and Vega-Embed itself, so the charts
render with no network (DVC's own page loads them from a CDN and shows nothing behind a firewall).

The libraries come from the pinned vl-convert-python package (`vl_convert.javascript_bundle()`), not from a
CDN. Run `python docs/offline-plots/build.py` after changing that pin; tests/test_offline_plots.py checks that the
committed page matches the installed package.
"""

from __future__ import annotations

from pathlib import Path

import vl_convert

TEMPLATE = Path(__file__).with_name("template.html")


def page() -> str:
    """DVC replaces {plot_divs} with one <div> per plot whose inline script calls vegaEmbed; the bundle, loaded
    before them as a classic script, defines window.vega, window.vegaLite and window.vegaEmbed. There is no
    {scripts} placeholder: that is where DVC would put its CDN <script> tags."""
    bundle = vl_convert.javascript_bundle()
    return ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset=\"utf-8\">\n"
            "    <title>DVC plots (offline)</title>\n"
            f"    <!-- Vega, Vega-Lite, Vega-Embed: vl-convert-python {vl_convert.__version__} -->\n"
            f"    <script>\n{bundle}\n    </script>\n"
            "    <style>\n        body { font-family: sans-serif; }\n        table { border-spacing: 15px; }\n"
            "    </style>\n</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n")


if __name__ == "__main__":
    TEMPLATE.write_text(page())
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size / 1e6:.1f} MB)")
