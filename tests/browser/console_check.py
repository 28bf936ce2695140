"""Drives the web console in headless Chromium (Debian's `chromium`, through Playwright) and
reports what a person would have seen, as JSON on stdout; the Rust test that runs this owns the
assertions (it compares the report with /metrics and with the same SQL over HTTP).

Usage: console_check.py SPEC_JSON
  SPEC_JSON: {"url": "http://127.0.0.1:PORT/", "out": "<screenshot folder>",
              "credentials": null | {"username": "...", "password": "..."},
              "queries": [{"name": "...", "sql": "...", "refused": false}], "settle_seconds": 5}
  A query with "refused": true is expected to get an HTTP error (its console line is expected).

Every request that leaves the console's origin is aborted and reported ("blocked"): the page
must work offline. Console errors, uncaught exceptions and dialogs are reported ("errors").
"""

import json
import os
import shutil
import sys
import time
from urllib.parse import urlsplit

from playwright.sync_api import sync_playwright


def chromium_path():
    for name in (os.environ.get("PRIMESPARK_CHROMIUM"), os.environ.get("PRIMESPARK_STACK_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium on PATH (deploy/dev/stack.sh tools installs it)")


READ_VALUES = """els => Object.fromEntries(els.map(e => [e.dataset.m, e.dataset.v === undefined ? null : e.dataset.v]))"""
READ_TEXTS = """els => Object.fromEntries(els.map(e => [e.dataset.m, e.textContent]))"""
READ_ROWS = """rows => rows.map(r => Array.from(r.querySelectorAll('td')).map(td => td.textContent))"""


def main():
    spec = json.loads(sys.argv[1])
    url = spec["url"]
    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    origin = urlsplit(url)
    report = {"errors": [], "expected_errors": [], "blocked": [], "screenshots": [], "sql": []}
    # A query marked "refused" answers with an HTTP error on purpose; Chromium logs that
    # response as a console error, which is then expected (and kept apart).
    phase = {"refused": False}

    def console_message(m):
        if m.type != "error":
            return
        if phase["refused"] and m.text.startswith("Failed to load resource"):
            report["expected_errors"].append(m.text)
        else:
            report["errors"].append("console: " + m.text)


    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        options = {"viewport": {"width": 1400, "height": 1000}, "ignore_https_errors": True}
        if spec.get("credentials"):
            options["http_credentials"] = spec["credentials"]
        context = browser.new_context(**options)

        def route(r):
            u = urlsplit(r.request.url)
            if (u.scheme, u.netloc) == (origin.scheme, origin.netloc) or u.scheme == "data":
                r.continue_()
            else:
                report["blocked"].append(r.request.url)
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.on("console", console_message)
        page.on("pageerror", lambda e: report["errors"].append("exception: " + str(e)))

        def dialog(d):
            report["errors"].append("dialog: " + d.message)
            d.dismiss()

        page.on("dialog", dialog)

        try:
            response = page.goto(url, wait_until="load")
        except Exception as e:  # headless Chromium cannot answer a login prompt
            answer = context.request.get(url)
            report["status"] = answer.status
            report["navigation_error"] = str(e).splitlines()[0]
            report["body"] = answer.text()[:2000]
            print(json.dumps(report))
            return
        report["status"] = response.status if response else None
        if not response or response.status != 200:
            report["body"] = page.content()[:2000]
            print(json.dumps(report))
            return

        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        first_at = page.get_attribute("body", "data-overview-at")
        report["first"] = page.eval_on_selector_all("[data-m]", READ_VALUES)
        report["first_texts"] = page.eval_on_selector_all("[data-m]", READ_TEXTS)
        report["first_at_us"] = int(first_at)
        time.sleep(spec.get("settle_seconds", 5))
        page.wait_for_function(
            "at => document.body.getAttribute('data-overview-at') !== at", arg=first_at, timeout=15000
        )
        report["second"] = page.eval_on_selector_all("[data-m]", READ_VALUES)
        report["second_at_us"] = int(page.get_attribute("body", "data-overview-at"))
        shot = os.path.join(out, "console-overview.png")
        page.screenshot(path=shot, full_page=True)
        report["screenshots"].append(shot)

        page.goto(url + "#recent")
        page.wait_for_selector("body[data-recent-ready='1']", timeout=15000)
        report["dead_letters"] = page.eval_on_selector_all("#dead-letters tbody tr", READ_ROWS)
        report["anomalies"] = page.eval_on_selector_all("#anomalies tbody tr", READ_ROWS)
        # Markup in a payload must stay text: no element it could have made exists.
        report["injected_elements"] = page.evaluate(
            "document.querySelectorAll('#dead-letters img, #dead-letters script, #dead-letters b, #dead-letters iframe').length"
        )
        report["xss"] = page.evaluate("window.__primespark_xss === undefined ? null : window.__primespark_xss")
        shot = os.path.join(out, "console-dead-letters.png")
        page.screenshot(path=shot, full_page=True)
        report["screenshots"].append(shot)

        page.goto(url + "#sql")
        for q in spec.get("queries", []):
            phase["refused"] = bool(q.get("refused"))
            page.fill("#sql-text", q["sql"])
            page.click("#sql-run")
            page.wait_for_selector(
                "#sql-result[data-state='done'], #sql-result[data-state='error']",
                state="attached",
                timeout=60000,
            )
            result = {
                "name": q["name"],
                "state": page.get_attribute("#sql-result", "data-state"),
                "status": page.text_content("#sql-status"),
                "columns": page.eval_on_selector_all("#sql-result thead th", "ths => ths.map(t => t.textContent)"),
                "rows": page.eval_on_selector_all("#sql-result tbody tr", READ_ROWS),
                "chart_series": page.eval_on_selector_all("#sql-svg polyline", "ps => ps.length"),
            }
            report["sql"].append(result)
            phase["refused"] = False
            shot = os.path.join(out, "console-sql-" + q["name"] + ".png")
            page.screenshot(path=shot, full_page=True)
            report["screenshots"].append(shot)

        context.close()
        browser.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
