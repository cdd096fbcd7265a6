"""mkdocs hooks (mkdocs.yml `hooks:`), run at every build:

- `reference/config.md`: its `<!-- config-reference -->` marker becomes the reference generated from raycap's
  pydantic models by `docs/gen_config_reference.py`, so the page cannot drift from the code;
- `history.md`: its `<!-- include benchmarks/RESULTS.md -->` marker becomes the dated lab notes of
  `benchmarks/RESULTS.md` (headings one level down, its plots copied beside the page's assets).

A page that lost its marker fails the build.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_MARKER = "<!-- include benchmarks/RESULTS.md -->"
PLOTS = "assets/results"  # where benchmarks/*.png land in the site


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    for png in sorted(RESULTS.parent.glob("*.png")):
        files.append(File.generated(config, f"{PLOTS}/{png.name}", abs_src_path=str(png)))
    return files


def results_markdown() -> str:
    """benchmarks/RESULTS.md for a page of its own: its headings one level down (outside code blocks), its
    images pointed at the copies in the site."""
    out, fence = [], None
    for line in RESULTS.read_text().splitlines():
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1).startswith(fence[0]) and len(m.group(1)) >= len(fence):
                fence = None
        elif fence is None:
            if line.startswith("#"):
                line = "#" + line
            line = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", rf"![\1]({PLOTS}/\2)", line)
        out.append(line)
    return "\n".join(out) + "\n"


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    if src == "reference/config.md":
        gen = _generator()
        if gen.MARKER not in markdown:
            raise ValueError(f"{src}: the marker {gen.MARKER} is gone; the generated reference has nowhere to go")
        return markdown.replace(gen.MARKER, gen.render())
    if src == "history.md":
        if RESULTS_MARKER not in markdown:
            raise ValueError(f"{src}: the marker {RESULTS_MARKER} is gone")
        return markdown.replace(RESULTS_MARKER, results_markdown())
    return markdown
