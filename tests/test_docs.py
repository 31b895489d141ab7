"""Every python block of the user-facing docs runs, and prints what the page says it prints."""
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/concepts.md", "docs/guides.md"]


def blocks(text):
    """(code, expected output or None) for each ```python block; a ```text block right after
    a code block is its expected output."""
    parts = re.findall(r"```(python|text)\n(.*?)```", text, flags=re.S)
    out = []
    for kind, body in parts:
        if kind == "python":
            out.append([body, None])
        elif out and out[-1][1] is None:
            out[-1][1] = body
    return out


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_and_prints_what_it_says(page):
    ns = {}
    for code, expected in blocks((ROOT / page).read_text()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, page, "exec"), ns)
        if expected is not None:
            assert buf.getvalue().strip() == expected.strip(), (page, code)
