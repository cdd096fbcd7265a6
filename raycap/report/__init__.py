"""The HTML report of a run: `python -m raycap.report RUN_DIR` (also written at the end of every training run).

`build_report(run_dir)` writes `RUN/report/index.html` with the test metrics of the supervised captioner beside
the fine-tuned one's, learning curves as PNG (plots.py), and a gallery of test images with references and both
captions, each with its retrieval rank and, on the world, its false claims marked (gallery.py); page.py renders
the HTML. Nothing in the report is chosen on the test split: it shows what the run already decided.
"""
from raycap.report.build import build_report

__all__ = ["build_report"]
