"""`dvc plots show` / `dvc plots diff` render with no network: the page carries Vega itself."""

from __future__ import annotations

import runpy

from tests.conftest import REPO

BUILD = REPO / "docs" / "offline-plots" / "build.py"


def test_the_committed_page_carries_the_pinned_packages_libraries():
    build = runpy.run_path(str(BUILD))
    page = build["page"]()
    assert (REPO / "docs/offline-plots/template.html").read_text() == page, (
        "docs/offline-plots/template.html is stale: run `python docs/offline-plots/build.py`")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN <script> tags have nowhere to go
    assert "cdn.jsdelivr" not in page and "window.vegaEmbed=" in page


def test_dvc_is_configured_to_use_it():
    config = (REPO / ".dvc/config").read_text()
    assert "html_template = ../docs/offline-plots/template.html" in config  # relative to .dvc/
