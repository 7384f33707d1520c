"""docs/serving.png: the `pixelseg serve` page in Debian's chromium with a real pet photo segmented.

    python tools/serve_screenshot.py runs/pets ../shared/data/oxford-iiit-pet-sample/images/X.jpg docs/serving.png

Uses the browser test's helpers (server on a free port, Playwright driving /usr/bin/chromium).
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("photo")
    ap.add_argument("out")
    ap.add_argument("--opacity", type=int, default=55)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from pixelseg.inference.serving import Engine
    from test_serve import running
    from test_serve_browser import CHROMIUM, CHROMIUM_ARGS, open_and_segment
    with running(Engine(args.model)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page, _ = open_and_segment(browser, url, Path(args.photo))
        page.fill("#opacity", str(args.opacity))
        page.dispatch_event("#opacity", "input")
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
