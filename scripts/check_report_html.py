"""Open report/report.html in headless Chromium, check that every image decoded, that none is shown
scaled below 90% of its own width (the figures are drawn to be read at full size: scaled down, their
numbers are unreadable), and save a screenshot.

Needs Debian's chromium (`apt-get install -y chromium`) and `pip install playwright` (no browser
download: the system Chromium is used). Usage: python scripts/check_report_html.py [report.html] [out.png]
"""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

page_path = Path(sys.argv[1] if len(sys.argv) > 1 else "report/report.html").resolve()
shot = Path(sys.argv[2] if len(sys.argv) > 2 else "report-screenshot.png")
flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
    page = browser.new_page(viewport={"width": 1200, "height": 900}, offline=True)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_path.as_uri())
    images = page.evaluate("[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0, i.naturalWidth, "
                           "i.clientWidth])")
    page.screenshot(path=str(shot), full_page=True)
    browser.close()
broken = [alt for alt, ok, _, _ in images if not ok]
scaled = [alt for alt, ok, width, shown in images if ok and shown < 0.9 * width]
external = [u for u in requests if not u.startswith(("file:", "data:"))]
print(f"{len(images)} images, {len(broken)} broken, {len(external)} external requests, {len(scaled)} scaled down; "
      f"screenshot -> {shot}")
for alt, ok, width, shown in images:
    state = "BROKEN" if not ok else "SCALED" if alt in scaled else "ok "
    print(f"  {state} {width:5d}px shown at {shown:5d}px  {alt}")
sys.exit(1 if broken or external or scaled or not images else 0)
