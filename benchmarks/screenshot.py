"""Screenshot an HTML page (e.g. `resvae report`'s) to a PNG, full page, 1200 px wide.

    python benchmarks/screenshot.py report.html report.png [--chromium /usr/bin/chromium]

Uses playwright's sync API to drive the system's Chromium (Debian: `apt-get install chromium`)
instead of playwright's own download, so it works on machines without network access.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright


def screenshot(html_path: str | Path, png_path: str | Path, chromium: str = "/usr/bin/chromium",
               width: int = 1200) -> Path:
    """Load `html_path` as a file:// page and save a full-page screenshot at `png_path`."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    if not html_path.is_file():
        raise SystemExit(f"screenshot: {html_path} does not exist")
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root (containers, CI)
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(html_path.as_uri(), wait_until="load")
            page.screenshot(path=str(png_path), full_page=True)
        finally:
            browser.close()
    return png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", help="the HTML page")
    ap.add_argument("png", help="where to write the screenshot")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--width", type=int, default=1200, help="viewport width in pixels")
    args = ap.parse_args(argv)
    print(screenshot(args.html, args.png, args.chromium, args.width))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
