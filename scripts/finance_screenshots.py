"""Screenshots of finance's pages for the README, in the system's headless Chromium (Playwright drives it;
no browser download): a book and a pass's refunds page at desktop width, and the book at a phone's 390 px.

    python scripts/finance_screenshots.py BOOK_HTML REFUNDS_HTML [--out docs/]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
SHOTS = (  # (page, file name, width, height of the clip)
    ("book", "finance-book.png", 1280, 1500),
    ("book", "finance-book-phone.png", 390, 1800),
    ("refunds", "finance-refunds-phone.png", 390, 1400),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book", type=Path)
    parser.add_argument("refunds", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed: `sudo apt-get install chromium`, then run this again.")
    from playwright.sync_api import sync_playwright

    pages = {"book": args.book.resolve(), "refunds": args.refunds.resolve()}
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        for which, name, width, height in SHOTS:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.goto(pages[which].as_uri())
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            if width < 640 and overflow > 0:  # the page must fit a phone; only its tables scroll sideways
                sys.exit(f"{name}: the page is {overflow} px wider than {width} px")
            page.screenshot(path=str(args.out / name))
            print(f"screenshot: {args.out / name}")
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
