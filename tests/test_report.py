"""The HTML report of a run: what it computes, and that it renders in a real browser (headless Chromium) with
every image and plot loaded."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from raycap.errors import UserError
from raycap.metrics.retrieval import target_ranks, target_wins
from raycap.report import build_report
from raycap.report.__main__ import main as report_main
from world_runs import SHORT

CURVES = ("curve_reward.png", "curve_train_p_at_1.png", "curve_kl.png", "curve_validation.png")


@pytest.fixture(scope="module")
def finished_run(printed_ray_run):
    """A 4-update Ray run on the shipped world (its trained captioner writes real captions; 200 train images)
    whose report is written by the training command itself (conftest.printed_ray_run)."""
    out, done = printed_ray_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return out


def test_ranks_agree_with_p_at_1_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    candidates = torch.tensor([[0, 1, 2], [1, 2, 0]])  # image 0's caption: cos 1, .6, 0 -> rank 1
    ranks = target_ranks(text, images, candidates)  # image 1's caption [0, 1]: .8 vs 1 and 0 -> rank 2
    assert ranks.tolist() == [1, 2]
    assert (ranks == 1).tolist() == target_wins(text, images, candidates).tolist()
    tie = target_ranks(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0, 1]]))
    assert tie.tolist() == [2]  # a tie is a miss for P@1, so not rank 1 either


def test_training_writes_the_report_with_the_runs_own_numbers(finished_run):
    report = finished_run / "report"
    html = (report / "index.html").read_text()
    for name in CURVES:
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.width > 300, name
        assert f'src="{name}"' in html
    final = json.loads((finished_run / "final_metrics.json").read_text())
    from raycap.config import RunConfig
    from raycap.report.gallery import compare_on_test

    cfg = RunConfig.model_validate(json.loads((finished_run / "config.json").read_text()))
    comparison = compare_on_test(cfg, finished_run / "final", report, 6)
    # the fine-tuned column is the run's own final test evaluation, recomputed from final/
    for key in ("p_at_1", "wellformed", "faithful", "precision", "recall", "vocab_size"):
        assert comparison.after[key] == final[key], key
    shipped = "fine-tuned, select"  # world-demo's eval.decoding
    assert [c["caption"] for c in final["examples"]] == [i.captions[shipped].text for i in comparison.items[:3]]
    assert len(comparison.items) == 6 and html.count('class="card"') == 6
    for item in comparison.items:
        assert item.truth and item.references
        assert list(item.captions) == ["supervised, greedy", "fine-tuned, greedy", shipped]
        assert (report / item.image).is_file() and f'src="{item.image}"' in html
        for view in item.captions.values():
            assert 1 <= view.rank <= 100 and f"rank {view.rank}" in html
    assert f"{comparison.before['p_at_1']:.3f}" in html and f"{final['p_at_1']:.3f}" in html
    # on the world every judged word is marked; the shipped captioner's captions are well-formed
    views = [v for item in comparison.items for v in item.captions.values()]
    assert all(v.words is not None and v.faithful is not None for v in views)
    assert 'class="w-true"' in html
    assert sum(v.faithful for v in views) == html.count('class="verdict good"')
    from raycap.data.grammar import word_verdicts

    first = comparison.items[0].captions["supervised, greedy"]
    assert first.words == word_verdicts(first.text, cfg_scene(cfg, 0))


def test_the_test_table_shows_rl_and_the_decoding_apart(finished_run):
    """Four rows on test (each captioner greedy and with the shipped `select`) in final_metrics.json, printed by
    the run and shown by the report; the shipped row is the run's own test evaluation, the error cuts are relative
    to the supervised captioner's greedy error."""
    final = json.loads((finished_run / "final_metrics.json").read_text())
    table = final["test_table"]
    rows = {(r["captioner"], r["decoding"]): r for r in table["rows"]}
    assert list(rows) == [("supervised", "greedy"), ("supervised", "select"), ("fine-tuned", "greedy"),
                          ("fine-tuned", "select")]
    assert table["n_images"] == final["n_images"] == 100
    for key in ("p_at_1", "wellformed", "faithful", "precision"):
        assert rows["fine-tuned", "select"][key] == final[key], key
    sup = rows["supervised", "greedy"]["p_at_1"]
    for decoding in ("greedy", "select"):
        by_hand = ((1 - sup) - (1 - rows["fine-tuned", decoding]["p_at_1"])) / (1 - sup)
        assert abs(table["error_cut_vs_supervised_greedy"][decoding] - by_hand) < 1e-9
    # selection changes the supervised captioner's captions too: its row is not the greedy one
    assert rows["supervised", "select"] != rows["supervised", "greedy"] | {"decoding": "select"}
    html = (finished_run / "report" / "index.html").read_text()
    table_html = html[html.index('id="decodings"'):].split("</table>")[0]
    assert table_html.count("<tr>") == 5  # the header and four rows
    for r in table["rows"]:
        assert f"<td>{r['captioner']}</td><td>{r['decoding']}</td><td>{r['p_at_1']:.3f}</td>" in table_html
    cut = table["error_cut_vs_supervised_greedy"]["select"]
    assert f"{100 * cut:.1f}%" in table_html


def test_the_test_table_prints_aligned_rows():
    from raycap.report.gallery import format_test_table

    table = {"n_images": 10, "error_cut_vs_supervised_greedy": {"greedy": 0.25, "select": 0.5},
             "rows": [{"captioner": c, "decoding": d, "p_at_1": p, "faithful": f}
                      for c, d, p, f in [("supervised", "greedy", 0.6, 0.8), ("supervised", "select", 0.7, 0.7),
                                         ("fine-tuned", "greedy", 0.7, 0.75), ("fine-tuned", "select", 0.8, 0.6)]]}
    lines = format_test_table(table).splitlines()
    assert lines[0] == "test, the first 10 images:" and lines[1].split() == ["p_at_1", "faithful", "P@1", "error", "cut"]
    assert lines[2].split() == ["supervised,", "greedy", "0.600", "0.800"]
    assert lines[5].split() == ["fine-tuned,", "select", "0.800", "0.600", "50.0%"]
    assert len({len(line) for line in lines[2:4]}) == 1  # the rows without a cut line up


def cfg_scene(cfg, i):
    from raycap.inputs import load_world

    return load_world(cfg.data.path).scene("test", i)


def test_report_of_a_run_in_progress_shows_its_curves(finished_run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "metrics.jsonl", "run.json"):
        shutil.copy(finished_run / name, partial / name)
    page = build_report(partial)
    html = page.read_text()
    assert "No final captioner yet" in html and 'class="card"' not in html
    assert all((partial / "report" / name).is_file() for name in CURVES)


def test_report_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no config.json"):
        build_report(tmp_path)
    (tmp_path / "config.json").write_text('{"rl": {"optimiser": {"lr": -1}}}')
    with pytest.raises(UserError, match=r"config.json: rl.optimiser.lr"):
        build_report(tmp_path)
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such run directory" in capsys.readouterr().err


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--allow-file-access-from-files", "--virtual-time-budget=5000", "--hide-scrollbars"]


def test_report_renders_in_headless_chromium_with_every_image(finished_run, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("RAYCAP_REQUIRE_BROWSER"):
            pytest.fail("RAYCAP_REQUIRE_BROWSER is set but no chromium is on the PATH")
        pytest.skip("no chromium on the PATH (.ci/run installs Debian's chromium)")
    page = (finished_run / "report" / "index.html").resolve()
    base = [browser, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    n_images = len(CURVES) + 6
    assert f'data-images="{n_images}"' in dom and 'data-broken="0"' in dom, dom[:2000]
    assert dom.count('data-loaded="1"') == n_images
    shot = tmp_path / "page.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1280, 2400)
        assert im.getpixel((10, 10)) == (0x23, 0x26, 0x2D)  # the header band was drawn
        assert len(im.getcolors(maxcolors=1 << 24)) > 200  # plots and images, not a blank page
    # and a broken image is detected and said on the page
    moved = tmp_path / "moved"
    shutil.copytree(finished_run / "report", moved)
    (moved / CURVES[0]).unlink()
    dom = subprocess.run([*base, "--dump-dom", (moved / "index.html").as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-broken="1"' in dom and "1 of 10 images failed to load" in dom
