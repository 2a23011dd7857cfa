"""`make check-book` (mlip_core.check_book) on a tiny hand-made book, in headless Chromium.

The pages use the markup jupyter-book 1 / myst-nb 1.x writes for executed cells
(`div.cell_output` holding `img`, `div.output stderr`, `div.output traceback`, ...).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from mlip_core import check_book


def _png(width: int = 2, height: int = 2) -> bytes:
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _notebook(path: Path, outputs_per_cell: list[list[dict]], tags: list[list[str]] | None = None) -> None:
    cells = []
    for i, outputs in enumerate(outputs_per_cell):
        cells.append({"cell_type": "code", "execution_count": i + 1, "source": "x",
                      "metadata": {"tags": (tags or [[]] * len(outputs_per_cell))[i]}, "outputs": outputs})
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb), encoding="utf-8")


PNG_OUT = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}
HTML_AND_PNG_OUT = {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
                    "data": {"text/html": "<table></table>", "image/png": "iVBOR", "text/plain": "df"}}
TEXT_OUT = {"output_type": "stream", "name": "stdout", "text": "hello\n"}


def _page(title: str, body: str, head: str = "") -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8" /><title>{title}</title>
<link rel="stylesheet" type="text/css" href="../_static/book.css" />
<script src="../_static/book.js"></script>{head}
</head><body><main><article><section><h1>{title}</h1>
{body}
</section></article></main></body></html>
"""


def _cell(output_html: str) -> str:
    return f"""<div class="cell docutils container">
<div class="cell_input docutils container"><div class="highlight-ipython3 notranslate"><div class="highlight"><pre><span></span>x</pre></div></div></div>
<div class="cell_output docutils container">
{output_html}
</div>
</div>"""


def _pre_output(classes: str, text: str) -> str:
    return f'<div class="output {classes} highlight-myst-ansi notranslate"><div class="highlight"><pre><span></span>{text}</pre></div>\n</div>'


TRACEBACK = """<span class="-Color -Color-Red">---------------------------------------------------------------------------</span>
<span class="-Color -Color-Red">ValueError</span>                                Traceback (most recent call last)
Cell In[3], line 1
----&gt; 1 raise ValueError("boom")

<span class="-Color -Color-Red">ValueError</span>: boom"""
TQDM_WALL = "\n".join(f"epoch 1: {p:3d}%|##        | {p}/100 [00:0{p % 10}&lt;00:10, 9.87it/s]" for p in range(10, 90, 10))
IPROGRESS = ("/work/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found. "
             "Please update jupyter and ipywidgets.\n  from .autonotebook import tqdm as notebook_tqdm")


def make_book(root: Path) -> Path:
    """book/ with notebooks/*.ipynb and _build/html/{index,notebooks/good,broken,noisy}.html."""
    book = root / "book"
    html = book / "_build" / "html"
    (html / "_images").mkdir(parents=True)
    (html / "_static").mkdir()
    (html / "notebooks").mkdir()
    (html / "_images" / "ok.png").write_bytes(_png())
    (html / "_images" / "corrupt.png").write_bytes(b"this is not a PNG")
    (html / "_static" / "book.css").write_text("body { margin: 0 }\n")
    (html / "_static" / "book.js").write_text("window.bookLoaded = true;\n")
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=notebooks/good.html" />\n')

    # good: one figure, rendered and loading; a plain stdout output.
    _notebook(book / "notebooks" / "good.ipynb", [[PNG_OUT], [TEXT_OUT]])
    (html / "notebooks" / "good.html").write_text(_page("Good", "\n".join([
        _cell('<img alt="../_images/ok.png" src="../_images/ok.png" />'),
        _cell(_pre_output("stream", "hello")),
    ])))

    # broken: two figures in the notebook; one <img> whose file is missing, one that is not an image,
    # and one figure's output removed by a tag (so it is not expected).
    _notebook(book / "notebooks" / "broken.ipynb", [[PNG_OUT], [PNG_OUT], [PNG_OUT]],
              tags=[[], [], ["remove-output"]])
    (html / "notebooks" / "broken.html").write_text(_page("Broken", "\n".join([
        _cell('<img alt="../_images/missing.png" src="../_images/missing.png" />'),
        _cell('<img alt="../_images/corrupt.png" src="../_images/corrupt.png" />'),
    ])))

    # noisy: a figure in the notebook that the page lacks (the text/html+png output renders as HTML
    # and does not count), a traceback, a tqdm wall and tqdm's IProgress warning, a missing script.
    _notebook(book / "notebooks" / "noisy.ipynb", [[PNG_OUT], [HTML_AND_PNG_OUT], [TEXT_OUT]])
    (html / "notebooks" / "noisy.html").write_text(_page("Noisy", "\n".join([
        _cell('<div class="output text_html"><table></table></div>'),
        _cell(_pre_output("traceback", TRACEBACK)),
        _cell(_pre_output("stderr", IPROGRESS) + "\n" + _pre_output("stderr", TQDM_WALL)),
    ]), head='\n<script src="../_static/gone.js"></script>'))
    return html


EXPECTED = {
    "notebooks/broken.html": {
        "404 image: ../_images/missing.png",
        "image did not load: ../_images/corrupt.png",
    },
    "notebooks/noisy.html": {
        "404 script: ../_static/gone.js",
        "0 of 1 figures rendered (counting the image outputs of notebooks/noisy.ipynb)",
        "error output (traceback): ValueError Traceback (most recent call last)",
        "progress-bar wall: 8 tqdm lines in the outputs",
        "tqdm warning 'IProgress not found' in an output",
    },
}


def test_expected_figures_follow_mime_priority_and_remove_tags(tmp_path):
    nb = tmp_path / "n.ipynb"
    _notebook(nb, [[PNG_OUT, TEXT_OUT], [HTML_AND_PNG_OUT], [PNG_OUT]], tags=[[], [], ["remove-cell"]])
    assert check_book.expected_figures(nb) == 1


def test_output_problems_without_a_browser():
    assert check_book.output_problems([{"classes": "output stream", "text": "loss 0.3\n"}]) == []
    few = "\n".join(f"{p}%|#| 1/2 [00:01<00:01, 1.00it/s]" for p in (10, 20))
    assert check_book.output_problems([{"classes": "output stderr", "text": few}]) == []
    problems = check_book.output_problems([
        {"classes": "output stream", "text": "Traceback (most recent call last):\n  File x\nKeyError: 'a'"},
        {"classes": "output stderr", "text": "RuntimeError: CUDA out of memory"},
        {"classes": "output stream", "text": "\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"},
    ])
    assert problems == [
        "Python traceback in an output: KeyError: 'a'",
        "stderr output mentions an error: RuntimeError: CUDA out of memory",
        "ANSI-coloured error in an output: \x1b[0;31mZeroDivisionError\x1b[0m: division by zero",
    ]


def test_a_markdown_table_left_as_text_is_found():
    raw = ('<div class="cell_output docutils container"><p>| profile | time |\n|\u2014|\u2014|\n'
           '| <code>ci</code> | 1 min |</p></div>')
    assert check_book.raw_markdown_tables(raw) == ["| profile | time |"]
    rendered = "<table><tr><th>profile</th></tr></table><p>a | b, and |x| in prose</p>"
    assert check_book.raw_markdown_tables(rendered) == []


def test_check_book_in_chromium_reports_exactly_the_planted_problems(tmp_path, capsys):
    if check_book.find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); `make check-book` installs it")
    html = make_book(tmp_path)
    status = check_book.main(["--html", str(html)])
    out = capsys.readouterr().out
    assert status == 1, out

    found: dict[str, set[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+\.html): (.+)$", line)
        if m:
            found.setdefault(m.group(1), set()).add(m.group(2))
    assert found == EXPECTED, out

    table = {line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")]
             for line in out.splitlines() if " | " in line}
    assert table["notebooks/good.html"] == ["notebooks/good.html", "1", "1 (1 rendered)", "0"]
    assert table["notebooks/broken.html"] == ["notebooks/broken.html", "0/2", "2 (2 rendered)", "2"]
    assert table["notebooks/noisy.html"] == ["notebooks/noisy.html", "0", "1 (0 rendered)", "5"]
    assert table["index.html"] == ["index.html", "0", "-", "0"]


def test_a_clean_book_passes(tmp_path, capsys):
    if check_book.find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); `make check-book` installs it")
    html = make_book(tmp_path)
    for name in ("broken", "noisy"):
        (html / "notebooks" / f"{name}.html").unlink()
        (tmp_path / "book" / "notebooks" / f"{name}.ipynb").unlink()
    assert check_book.main(["--html", str(html)]) == 0, capsys.readouterr().out
