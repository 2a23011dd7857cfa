"""Check the built book in a real browser: ``python -m mlip_core.check_book`` (``make check-book``).

Every ``*.html`` page under ``book/_build/html`` (``_static/``, ``_sources/``, ``_images/`` left out)
is opened in headless Chromium, and the run fails (exit status 1, one ``PAGE: problem`` line per
problem) on

* an image that did not load (``img.complete && img.naturalWidth === 0`` in the browser), or an
  image, script or stylesheet of the page whose file is missing (what a server would answer 404);
* a chapter page with fewer rendered figures than its executed notebook has image outputs
  (``book/notebooks/NAME.ipynb``; ``_build/html/_sources/NAME.ipynb`` when that is absent);
* a Python traceback in an output: "Traceback (most recent call last)", ANSI escapes next to an
  error, an error output (``output traceback``), or an ``output stderr`` block containing "Error";
* a progress-bar wall: many tqdm lines (``12%|``, ``it/s]``) in the outputs of one page, or tqdm's
  "IProgress not found" warning;
* a Markdown table an output displayed that was not rendered as a table (its ``|---|`` row shows as text:
  the book's Markdown output format has no tables);

and prints a table ``page | images | figures expected | problems`` first.

How: no DevTools client and no browser download. Each page is copied into a temporary folder with
two additions, a ``<base href="file:///…/page-folder/">`` (so every relative image, script and
stylesheet still resolves to the built book) and a small probe ``<script>`` at the end of the body.
The probe writes a JSON summary (every ``<img>`` with ``complete``/``naturalWidth``, the text and
classes of every rendered output) into a hidden ``<pre id="check-book-result">``, right away and
again on ``window.load``. ``chromium --headless=new --virtual-time-budget=… --dump-dom`` runs the
page until the load event and its timers are done and prints the final DOM, from which the JSON is
read back. Chromium does not report HTTP-style 404s for ``file://`` pages, so missing local
resources are found by resolving each ``img[src]``, ``script[src]`` and stylesheet / preload
``link[href]`` of the page against the book on disk. A page that only redirects
(``<meta http-equiv="Refresh">``, jupyter-book's ``index.html``) is checked for its target only.
At most two Chromium processes run at once.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HTML = REPO / "book" / "_build" / "html"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}
RESULT_ID = "check-book-result"
REFRESH_RE = re.compile(
    r"""<meta[^>]*http-equiv=["']?refresh["']?[^>]*content=["']?\s*\d+\s*;\s*url=([^"'>\s]+)""", re.I)

# myst-nb 1.x's mime priority for the HTML builder (myst_nb.core.render.get_mime_priority("html")):
# an output is rendered as its first bundle entry in this order, so an output carrying text/html
# and image/png shows the HTML, not an <img>.
HTML_MIME_PRIORITY = (
    "application/vnd.jupyter.widget-view+json", "application/javascript", "text/html",
    "image/svg+xml", "image/png", "image/gif", "image/jpeg",
    "text/markdown", "text/latex", "text/plain",
)
IMAGE_MIMES = {"image/svg+xml", "image/png", "image/gif", "image/jpeg"}
REMOVE_OUTPUT_TAGS = {"remove-output", "remove_output", "remove-cell", "remove_cell"}

TRACEBACK_RE = re.compile(r"Traceback \(most recent call last\)")
ANSI_RE = re.compile(r"\x1b\[[\d;]*m|(?<![\w\[])\[(?:\d{1,3};)*\d{1,3}m")
ERROR_RE = re.compile(r"\w*(?:Error|Exception)\b")
PROGRESS_RE = re.compile(r"\d+%\||\bit/s\]|\bs/it\]")
IPROGRESS = "IProgress not found"
PROGRESS_WALL_LINES = 5  # this many tqdm lines in one page's outputs make a wall

PROBE = """
<script>
(function () {
  var pre = document.createElement('pre');
  pre.id = '%(id)s';
  pre.hidden = true;
  document.body.appendChild(pre);
  [].forEach.call(document.images, function (im) { if (im.loading === 'lazy') im.loading = 'eager'; });
  function collect(loaded) {
    var images = [].map.call(document.images, function (im) {
      return {src: im.currentSrc || im.src, complete: im.complete, naturalWidth: im.naturalWidth,
              in_output: !!im.closest('.cell_output')};
    });
    var outputs = [].map.call(document.querySelectorAll('.cell_output .output, div.output'),
      function (el) { return {classes: el.className, text: el.textContent}; });
    pre.textContent = JSON.stringify({loaded: loaded, images: images, outputs: outputs});
  }
  collect(false);
  window.addEventListener('load', function () { collect(true); });
})();
</script>
""" % {"id": RESULT_ID}


@dataclass
class PageReport:
    page: str  # path relative to the HTML root, with forward slashes
    images: int = 0
    images_loaded: int = 0
    figures_rendered: int = 0
    figures_expected: int | None = None  # None: not a chapter page (no notebook)
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the notebook side
def expected_figures(notebook: Path) -> int:
    """Outputs of an executed notebook that myst-nb renders as an ``<img>``."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    count = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        tags = set(cell.get("metadata", {}).get("tags", []) or [])
        if tags & REMOVE_OUTPUT_TAGS:
            continue
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            chosen = next((m for m in HTML_MIME_PRIORITY if m in data), None)
            if chosen in IMAGE_MIMES:
                count += 1
    return count


def notebook_for(page: Path, html_root: Path, book_dir: Path | None) -> Path | None:
    rel = page.relative_to(html_root).with_suffix(".ipynb")
    candidates = [book_dir / rel] if book_dir is not None else []
    candidates.append(html_root / "_sources" / rel)
    return next((c for c in candidates if c.is_file()), None)


# ----------------------------------------------------------------------------- static resources
class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, str]] = []  # (kind, url)

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag == "img" and a.get("src"):
            self.found.append(("image", a["src"]))
        elif tag == "script" and a.get("src"):
            self.found.append(("script", a["src"]))
        elif tag == "link" and a.get("href"):
            rel = a.get("rel", "").lower().split()
            if "stylesheet" in rel:
                self.found.append(("css", a["href"]))
            elif "preload" in rel and a.get("as") in ("script", "style", "image"):
                kind = {"style": "css"}.get(a["as"], a["as"])
                self.found.append((kind, a["href"]))

    handle_startendtag = handle_starttag


def local_file(url: str, base_dir: Path) -> Path | None:
    """The file a relative or file:// URL points to; None for data:, http(s): and the like."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme or parts.netloc or not parts.path:
        return None
    return (base_dir / unquote(parts.path)).resolve()


def missing_resources(page: Path) -> list[tuple[str, str, Path]]:
    parser = _Resources()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    missing, seen = [], set()
    for kind, url in parser.found:
        path = local_file(url, page.parent)
        if path is not None and path not in seen and not path.is_file():
            seen.add(path)
            missing.append((kind, url, path))
    return missing


# ----------------------------------------------------------------------------- the browser side
def find_chromium(explicit: str | None = None) -> str | None:
    for name in ([explicit] if explicit else []) + [os.environ.get("CHROMIUM", "")] + list(CHROMIUM_NAMES):
        if name and (found := shutil.which(name)):
            return found
    return None


def probe_copy(page: Path, workdir: Path) -> Path:
    """A copy of the page, with <base> pointing at the page's folder and the probe script."""
    text = page.read_text(encoding="utf-8", errors="replace")
    base = f'<base href="{page.parent.resolve().as_uri()}/">'
    m = re.search(r"<head\b[^>]*>", text, re.I)
    text = text[: m.end()] + base + text[m.end():] if m else base + text
    idx = text.lower().rfind("</body>")
    text = text[:idx] + PROBE + text[idx:] if idx >= 0 else text + PROBE
    out = workdir / page.name
    out.write_text(text, encoding="utf-8")
    return out


def run_in_browser(page: Path, chromium: str, budget_ms: int = 5000, timeout_s: float = 90) -> dict:
    with tempfile.TemporaryDirectory(prefix="check-book-") as tmp:
        tmp = Path(tmp)
        copy = probe_copy(page, tmp)
        cmd = [
            chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
            "--mute-audio", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
            f"--virtual-time-budget={budget_ms}", "--dump-dom", copy.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              encoding="utf-8", errors="replace")
    m = re.search(rf'<pre[^>]*id="{RESULT_ID}"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    if not m:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"no result from chromium ({tail[0][:200]})")
    return json.loads(html.unescape(m.group(1)))


# ----------------------------------------------------------------------------- judging a page
def _first_line(text: str, pattern: re.Pattern) -> str:
    for line in text.splitlines():
        if pattern.search(line):
            return " ".join(line.split())[:120]
    return ""


# the delimiter row of a Markdown table left as text (Sphinx's smartquotes turn --- into an em dash)
RAW_TABLE_RE = re.compile(r"^\s*\|(\s*:?[-\u2013\u2014]+:?\s*\|)+\s*$", re.M)
PARAGRAPH_RE = re.compile(r"<p>(.*?)</p>", re.S)


def raw_markdown_tables(page_html: str) -> list[str]:
    """The first line of every paragraph of ``page_html`` that is a Markdown table left as text (a cell's
    displayed Markdown parsed without table support shows its pipes and its ``|---|`` row as a paragraph)."""
    found = []
    for m in PARAGRAPH_RE.finditer(page_html):
        text = html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))
        if RAW_TABLE_RE.search(text):
            found.append(text.strip().splitlines()[0][:100])
    return found


def output_problems(outputs: list[dict]) -> list[str]:
    problems: list[str] = []
    progress_lines = 0
    iprogress = False
    for out in outputs:
        classes = set(out.get("classes", "").split())
        text = out.get("text", "")
        if "traceback" in classes:
            problems.append(f"error output (traceback): {_first_line(text, ERROR_RE) or text.strip()[:120]}")
        elif TRACEBACK_RE.search(text):
            problems.append(f"Python traceback in an output: {_first_line(text, ERROR_RE) or 'Traceback (most recent call last)'}")
        elif ANSI_RE.search(text) and ERROR_RE.search(text):
            problems.append(f"ANSI-coloured error in an output: {_first_line(text, ERROR_RE)}")
        elif "stderr" in classes and "Error" in text:
            problems.append(f"stderr output mentions an error: {_first_line(text, re.compile('Error'))}")
        progress_lines += sum(1 for line in re.split(r"[\r\n]+", text) if PROGRESS_RE.search(line))
        iprogress = iprogress or IPROGRESS in text
    if progress_lines >= PROGRESS_WALL_LINES:
        problems.append(f"progress-bar wall: {progress_lines} tqdm lines in the outputs")
    if iprogress:
        problems.append("tqdm warning 'IProgress not found' in an output")
    return problems


def check_page(page: Path, html_root: Path, book_dir: Path | None, chromium: str,
               budget_ms: int = 5000) -> PageReport:
    report = PageReport(page=page.relative_to(html_root).as_posix())
    missing = missing_resources(page)
    missing_paths = {p for _, _, p in missing}
    for kind, url, _ in missing:
        report.problems.append(f"404 {kind}: {url}")
    source = page.read_text(encoding="utf-8", errors="replace")
    report.problems.extend(f"Markdown table shown as text: {first}" for first in raw_markdown_tables(source))
    redirect = REFRESH_RE.search(source)
    if redirect:  # jupyter-book's index.html only forwards to the root page, which is checked itself
        target = local_file(html.unescape(redirect.group(1)), page.parent)
        if target is not None and not target.is_file():
            report.problems.append(f"404 redirect target: {redirect.group(1)}")
        return report
    try:
        result = run_in_browser(page, chromium, budget_ms)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        report.problems.append(f"browser check failed: {exc}")
        return report
    if not result.get("loaded"):
        report.problems.append("the page's load event never fired")
    images = result.get("images", [])
    report.images = len(images)
    for im in images:
        report.figures_rendered += bool(im.get("in_output"))  # a broken one is reported below
        broken = im.get("complete") and im.get("naturalWidth", 0) == 0
        if not broken:
            report.images_loaded += 1
            continue
        path = local_file(im.get("src", ""), page.parent)
        if path is None or path not in missing_paths:  # a missing file is already reported as 404
            src = im.get("src", "")
            shown = os.path.relpath(path, page.parent) if path is not None else src
            report.problems.append(f"image did not load: {shown}")
    notebook = notebook_for(page, html_root, book_dir)
    if notebook is not None:
        report.figures_expected = expected_figures(notebook)
        if report.figures_rendered < report.figures_expected:
            rel = notebook.relative_to(book_dir) if book_dir and notebook.is_relative_to(book_dir) else notebook.name
            report.problems.append(f"{report.figures_rendered} of {report.figures_expected} figures "
                                   f"rendered (counting the image outputs of {rel})")
    report.problems.extend(output_problems(result.get("outputs", [])))
    return report


def pages_of(html_root: Path) -> list[Path]:
    return sorted(p for p in html_root.rglob("*.html")
                  if not SKIP_DIRS & set(p.relative_to(html_root).parts[:-1]))


def check_book(html_root: Path, book_dir: Path | None = None, chromium: str | None = None,
               jobs: int = 2, budget_ms: int = 5000) -> list[PageReport]:
    html_root = html_root.resolve()
    if book_dir is None and html_root.parent.name == "_build":
        book_dir = html_root.parent.parent
    chromium_path = find_chromium(chromium)
    if chromium_path is None:
        raise FileNotFoundError("no Chromium found (apt-get install -y chromium, or set CHROMIUM=...)")
    pages = pages_of(html_root)
    with ThreadPoolExecutor(max_workers=max(1, min(2, jobs))) as pool:
        return list(pool.map(lambda p: check_page(p, html_root, book_dir, chromium_path, budget_ms), pages))


def format_table(reports: list[PageReport]) -> str:
    rows = [("page", "images", "figures expected", "problems")]
    for r in reports:
        images = f"{r.images_loaded}/{r.images}" if r.images_loaded != r.images else str(r.images)
        expected = "-" if r.figures_expected is None else f"{r.figures_expected} ({r.figures_rendered} rendered)"
        rows.append((r.page, images, expected, str(len(r.problems))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, default=DEFAULT_HTML, help="the built book (default: %(default)s)")
    ap.add_argument("--book", type=Path, default=None,
                    help="the book's source folder with notebooks/*.ipynb (default: two levels above --html "
                         "when it ends in _build/html; else _sources/ of the build)")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM or chromium on PATH)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel Chromium processes, at most 2")
    ap.add_argument("--budget-ms", type=int, default=5000, help="Chromium's --virtual-time-budget per page")
    args = ap.parse_args(argv)
    if not (args.html / "index.html").is_file():
        print(f"check-book: no built book at {args.html} (run `make book` first)", file=sys.stderr)
        return 2
    try:
        reports = check_book(args.html, args.book, args.chromium, args.jobs, args.budget_ms)
    except FileNotFoundError as exc:
        print(f"check-book: {exc}", file=sys.stderr)
        return 2
    print(format_table(reports))
    problems = [f"{r.page}: {p}" for r in reports for p in r.problems]
    if problems:
        print()
        print("\n".join(problems))
        print(f"\ncheck-book: {len(problems)} problem(s) in {sum(bool(r.problems) for r in reports)} page(s)")
        return 1
    print(f"\ncheck-book: {len(reports)} page(s), no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
