"""The report of a real run, opened from file:// in headless Chromium.

A tiny random Llama (``tiny_dir``) generates 16 tokens for 6 member and 6 non-member
questions through the real CLI (``run``, then ``report --ablations``); three member
questions carry hostile markup. The page must load with no console error and no network
request, show one row per question, reorder when sorted by TPD, open a row onto its
tokens, filter, leave ``document.title`` alone and fire no dialog, and render a
non-blank screenshot.

Needs Debian's ``chromium`` and the ``playwright`` package (the system browser is used,
nothing is downloaded); ``scripts/ci_browser.sh`` installs both. Without them the test
is skipped, unless ``DISTILL_DETECT_REQUIRE_BROWSER=1`` (set by that script), where it
fails instead.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings

import pytest

HOSTILE = [
    "<script>document.title='pwned'</script> How many apples are left?",
    '"><img src=x onerror="document.title=\'pwned\'"> What is 7 times 8?',
    "</textarea><b>not bold</b> & what is 2 + 2?",
]
TITLE = "distill-detect report"
N_PER_SIDE = 6
MAX_NEW = 16


def _chromium() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and (path := shutil.which(cand)):
            return path
    return None


def _need_or_skip(reason: str):
    if os.environ.get("DISTILL_DETECT_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (DISTILL_DETECT_REQUIRE_BROWSER=1)")
    pytest.skip(reason + "; run 'bash scripts/ci_browser.sh' to install it")


@pytest.fixture(scope="session")
def browser_path():
    path = _chromium()
    if path is None:
        _need_or_skip("no chromium found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need_or_skip("the playwright package is not installed")
    return path


@pytest.fixture(scope="session")
def real_report(tmp_path_factory, tiny_dir, browser_path):
    """A report of a real run of the tiny model, built through the CLI."""
    from distill_detect import cli

    d = tmp_path_factory.mktemp("browser")
    members = [{"id": f"m{i}", "question": f"Tom has {i + 3} apples and eats one. How many are left?"} for i in range(N_PER_SIDE)]
    for i, text in enumerate(HOSTILE):
        members[i]["question"] = text
    nonmembers = [
        {"id": f"n{i}", "question": f"A train travels {10 * i + 5} km in an hour. How far in {i + 2} hours?"}
        for i in range(N_PER_SIDE)
    ]
    for name, rows in (("members.jsonl", members), ("nonmembers.jsonl", nonmembers)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = d / "results"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(
            [
                "run",
                "--model",
                str(tiny_dir),
                "--members",
                str(d / "members.jsonl"),
                "--nonmembers",
                str(d / "nonmembers.jsonl"),
                "--max-new-tokens",
                str(MAX_NEW),
                "--methods",
                "tpd,out_ppl,loss",
                "--bootstrap",
                "50",
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        assert cli.main(["report", str(out), "--ablations", "--tokenizer", str(tiny_dir), "--no-figures"]) == 0
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    return out / "report.html", scores


@pytest.fixture(scope="session")
def browser(browser_path):
    """One headless Chromium for every page of this module (Playwright's sync API allows one driver per thread)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def page_and_log(real_report, browser):
    html, _ = real_report
    log = {"errors": [], "dialogs": [], "requests": []}
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: log["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: log["errors"].append(str(e)))
    page.on("request", lambda r: log["requests"].append(r.url) if not r.url.startswith(("file:", "data:")) else None)

    def on_dialog(d):
        log["dialogs"].append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(html.as_uri())
    page.wait_for_selector("tr.q-row")
    yield page, log
    page.close()


def _ids(page) -> list[str]:
    return page.locator("tr.q-row td.id").all_text_contents()


def test_page_loads_cleanly_with_one_row_per_question(page_and_log, real_report):
    page, log = page_and_log
    _, scores = real_report
    assert page.locator("tr.q-row").count() == 2 * N_PER_SIDE == len(scores)
    assert sorted(_ids(page)) == sorted(r["id"] for r in scores)
    for section in ("metrics", "roc", "scores", "tokprobs", "ablations", "questions"):
        assert page.locator(f"section#{section}").count() == 1, section
    assert page.locator("#roc svg path").count() >= 3
    assert log["errors"] == [] and log["requests"] == []


def test_sorting_by_tpd_reorders_the_rows(page_and_log, real_report):
    page, _ = page_and_log
    _, scores = real_report
    before = _ids(page)
    tpd = {r["id"]: r["tpd"] for r in scores}
    expected = [r["id"] for r in sorted(scores, key=lambda r: r["tpd"])]  # stable: input order breaks ties
    page.click('th[data-key="m:tpd"]')
    after = _ids(page)
    assert after == expected
    if expected != before:
        assert after != before
    page.click('th[data-key="m:tpd"]')  # again: descending
    desc = [tpd[i] for i in _ids(page)]
    assert desc == sorted(desc, reverse=True)
    page.click('th[data-key="index"]')
    assert _ids(page) == before


def test_opening_a_row_shows_its_tokens(page_and_log, real_report):
    page, _ = page_and_log
    row = page.locator("tr.q-row").first
    qid = row.locator("td.id").text_content()
    row.click()
    detail = page.locator("tr.q-detail")
    assert detail.count() == 1
    toks = detail.locator(".tokens .tok")
    assert 1 <= toks.count() <= MAX_NEW
    title = toks.first.get_attribute("title")
    assert "p = " in title and "TPD" in title
    assert detail.locator(f'.tokens[data-qid="{qid}"]').count() == 1
    row.click()
    assert page.locator("tr.q-detail").count() == 0


def test_hostile_questions_show_as_text_and_run_nothing(page_and_log):
    page, log = page_and_log
    page.click("#open-all")
    assert page.locator("tr.q-detail").count() == 2 * N_PER_SIDE
    shown = page.locator("tr.q-detail .detail-q").all_text_contents()
    for text in HOSTILE:
        assert text in shown
    assert page.title() == TITLE and page.evaluate("document.title") == TITLE
    assert page.locator("img").count() == 0 and page.locator("textarea").count() == 0 and page.locator("b").count() == 0
    assert page.locator("script").count() == 2  # the data block and the page's own script
    assert log["dialogs"] == [] and log["errors"] == []
    page.click("#close-all")


def test_filters(page_and_log):
    page, _ = page_and_log
    page.select_option("#flabel", "0")
    assert page.locator("tr.q-row").count() == N_PER_SIDE
    page.select_option("#flabel", "all")
    page.fill("#fsearch", "pwned")
    assert page.locator("tr.q-row").count() == 2
    page.fill("#fsearch", "")
    page.select_option("#level", "0.05")
    page.select_option("#fverdict", "flag")
    flagged = page.locator("tr.q-row").count()
    page.select_option("#fverdict", "noflag")
    assert flagged + page.locator("tr.q-row").count() == 2 * N_PER_SIDE
    page.select_option("#fverdict", "all")
    assert "FPR on non-members" in page.locator("#status").text_content()


def test_screenshot_is_not_blank(page_and_log):
    from PIL import Image

    page, log = page_and_log
    png = page.screenshot(full_page=True)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.width >= 1000 and img.height > 1500
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 200
    assert log["errors"] == []


# -- a new user's first hour: the verdict in view, the model named, audit cards, TPR caveats ---------------


def _open(browser, html, width=1280):
    """(page, errors) for ``html`` at a viewport ``width`` px wide."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html.as_uri())
    page.wait_for_selector("tr.q-row")
    return page, errors


def _in_view(page, selector) -> dict:
    """Where an element lies against the window and its scrolling table box (nothing scrolled)."""
    return page.evaluate(
        """(sel) => {
          const e = document.querySelector(sel), w = e.closest('.tablewrap');
          const r = e.getBoundingClientRect(), b = w.getBoundingClientRect();
          return {right: r.right, left: r.left, wrapRight: b.right, scrollLeft: w.scrollLeft, innerWidth: window.innerWidth,
                  index: Array.prototype.indexOf.call(e.parentNode.children, e)};
        }""",
        selector,
    )


@pytest.fixture(scope="module")
def wide_report(real_report, tmp_path_factory):
    """The real run's results with 15 more score columns (about 20 columns in all), as many methods give."""
    from distill_detect.report import write_report

    html, scores = real_report
    d = tmp_path_factory.mktemp("wide")
    (d / "metrics.json").write_text((html.parent / "metrics.json").read_text())
    rows = []
    for i, r in enumerate(scores):
        rows.append({**r, **{f"extra_method_{k:02d}": float(i * k) for k in range(15)}})
    (d / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_report(d, figures=False)


def test_verdict_column_is_in_view_at_1400px(wide_report, browser):
    page, errors = _open(browser, wide_report, width=1400)
    try:
        assert page.locator("#qtable thead th").count() >= 20
        # The table does scroll sideways, yet the verdict needs no scrolling: it sits next to the id.
        assert page.evaluate("document.querySelector('#qtable').closest('.tablewrap').scrollWidth > 1400")
        pos = _in_view(page, '#qtable th[data-key="verdict"]')
        assert pos["index"] == 2 and pos["scrollLeft"] == 0
        assert pos["left"] >= 0 and pos["right"] <= min(pos["wrapRight"], pos["innerWidth"])
        ids = page.locator('#qtable th[data-key="id"]')
        assert ids.count() == 1
        # Each row's verdict cell lines up under its header.
        first = page.locator("tr.q-row").first.locator("td").nth(2)
        assert first.locator(".badge").count() == 1
        assert errors == []
    finally:
        page.close()


def test_header_names_the_model_and_tpr_carries_its_caveat(page_and_log, tiny_dir):
    page, log = page_and_log
    bits = page.locator("div.meta").first.locator("span").all_text_contents()
    model = [b for b in bits if b.startswith("model: ")]
    assert model == [f"model: llama checkpoint at {tiny_dir.resolve()} (hf, float32, cpu)"]
    cards = page.inner_text("#cards")
    assert f"from {N_PER_SIDE} non-members: under 100, a TPR at 1% FPR means little" in cards
    assert f"from {N_PER_SIDE} non-members: under 100, a TPR at 5% FPR means little" in cards
    assert page.locator("section#metrics td .mark").count() >= 3
    assert "a TPR at 1% FPR means little" in page.inner_text("section#metrics")
    assert log["errors"] == []


def run_audit(*args, **kw):
    """``distill_detect.audit.audit`` on membership scores (higher = member), stated where the API asks for it."""
    import inspect

    from distill_detect.audit import audit

    if "higher_is_member" in inspect.signature(audit).parameters:
        kw["higher_is_member"] = True
    return audit(*args, **kw)


@pytest.fixture(scope="module")
def audit_report(real_report, tmp_path_factory):
    """An audit directory over the real run: members as the benchmark (labels dropped), non-members as the reference."""
    from distill_detect.report import write_report

    html, scores = real_report
    config = json.loads((html.parent / "metrics.json").read_text())["config"]
    bench = [r for r in scores if r["label"] == 1]
    ref = [r for r in scores if r["label"] == 0]
    res = run_audit([r["id"] for r in bench], [-r["tpd"] for r in bench], [-r["tpd"] for r in ref], fdr=0.5, alpha=0.5, n_boot=20)
    doc = res.to_dict()
    for row, r in zip(doc["questions"], bench):
        row["raw_score"] = r["tpd"]
    doc.update(
        {
            "method": "tpd",
            "params": {"tau": 1.0, "alpha": 0.6, "max_tokens": 300},
            "higher_is_member": False,
            "benchmark": {"source": "members.jsonl", "n": len(bench)},
            "reference": {"source": "nonmembers.jsonl", "kind": "file", "n": len(ref)},
            "model": "tiny-llama",
            "source": config["source"],
            "created": "2025-01-01T00:00:00Z",
        }
    )
    d = tmp_path_factory.mktemp("audit")
    (d / "audit.json").write_text(json.dumps(doc))
    rows = [{"id": r["id"], "tpd": r["tpd"]} for r in bench] + [{"id": r["id"], "label": 0, "tpd": r["tpd"]} for r in ref]
    (d / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_report(d, figures=False), doc


def test_audit_page_speaks_of_benchmark_and_reference_questions(audit_report, browser):
    html, doc = audit_report
    page, errors = _open(browser, html, width=1400)
    try:
        cards = page.inner_text("#cards")
        assert "benchmark questions" in cards and "reference questions" in cards and "flagged questions" in cards
        assert "member" not in cards and "distillation data" not in cards and "never trained on" not in cards
        # No per-method AUC/TPR table: there are no known members.
        assert page.locator("section#metrics").count() == 0
        # The question table: the audit's own flags as the verdict, groups named as what they are.
        assert page.locator("tr.q-row").count() == doc["n_bench"] + doc["n_ref"]
        labels = set(page.locator("tr.q-row td:nth-child(4) .badge").all_text_contents())
        assert labels == {"benchmark", "reference"}
        verdicts = page.locator("tr.q-row td:nth-child(3) .badge").all_text_contents()
        assert verdicts.count("flagged") == doc["n_flagged"] and verdicts.count("not tested") == doc["n_ref"]
        assert "member" not in " ".join(verdicts)
        status = page.inner_text("#status")
        assert "Benjamini–Hochberg" in status and "non-members" not in status
        page.select_option("#vmethod", "tpd")  # a method's threshold on the reference, still not "member"
        verdicts = page.locator("tr.q-row td:nth-child(3) .badge").all_text_contents()
        assert "member" not in " ".join(verdicts) and "non-members" not in page.inner_text("#status")
        legend = page.inner_text("section#scores")
        assert "benchmark questions" in legend and "reference questions" in legend and "non-members" not in legend
        assert errors == []
    finally:
        page.close()
