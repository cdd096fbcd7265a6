"""The documentation: the README as a front page, every command line of README.md and docs/ parsed by the real
argument parser of its command, the generated config reference complete, and the site built with --strict.

Which lines are checked: every line inside a fenced code block (``` or ~~~, any language) of README.md and
docs/**/*.md, after joining backslash continuations, that starts with `raycap SUBCOMMAND ...` or
`python -m raycap.MODULE ...`; in shell blocks (```bash, sh, shell, console) also such a command after `&&`,
`||`, `;` or `|`, after leading `VAR=value` assignments, and after the `--` of `ray job submit ... --`. The line is split as the shell would (shlex: quotes, a trailing `# comment`
dropped). Skipped: lines asking for `--help` / `-h`, and lines holding a shell placeholder written in angle
brackets (`<run-dir>`), which a shell would read as a redirection; the docs write placeholders as upper-case words
(RUN, DIR, N), which parse like any argument and so are checked.

How a line is checked, without running anything: the subcommand must be one of `raycap.commands.COMMANDS`; its
module's `build_parser()` (the package's `__main__` for `raycap.report` / `raycap.data`) must parse the arguments
(argparse's SystemExit is a failure, with its message; abbreviated flags are refused, the docs spell flags out); each `--set KEY=VALUE` key must name a field of the model
that command reads (RunConfig; WorldConfig for `pretrain world`; CaptionerStageConfig for `pretrain captioner`;
`search.*` of a space for `tune`); `--config` / `--select-config` / `--space` values that are not paths must be
named configs / spaces; and a `raycap train` or `raycap card` line on a named config must load (the whole config
validated with its `--set` values, as the command would before starting anything).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = "<!-- test-command -->"
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w.-]*>")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
SHELLS = {"bash", "sh", "shell", "console", "zsh"}


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


# -- finding the command lines --------------------------------------------------------------------------------------


def fenced_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, line, the block's language) inside fenced code blocks, backslash continuations joined onto
    their first line."""
    out, fence, lang, pending, start = [], None, "", None, 0
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and (fence is None or (m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence))):
            fence, lang = (m.group(1), line[m.end():].strip().split(" ")[0]) if fence is None else (None, "")
            pending = None
            continue
        if fence is None:
            continue
        if pending is not None:
            line, n = pending + " " + line.strip(), start
        if line.rstrip().endswith("\\"):
            pending, start = line.rstrip()[:-1].rstrip(), n
            continue
        pending = None
        out.append((n, line, lang))
    return out


def split_line(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def commands_in(line: str, lang: str = "bash") -> list[tuple[str, list[str]]]:
    """[(entry, args)] of the raycap commands a shell line runs: entry is `raycap` or a module (`raycap.train`).
    Outside shell blocks (```bash, sh, shell, console) only a line that starts with the command counts: other
    blocks hold program output, YAML or Python."""
    if not re.search(r"\braycap\b", line) or PLACEHOLDER.search(line):
        return []
    if lang not in SHELLS and not re.match(r"\s*(\$ )?(raycap |python3? -m raycap)", line):
        return []
    try:
        tokens = split_line(line.strip().removeprefix("$ "))
    except ValueError:  # an unbalanced quote: not a shell line (YAML, Python, a log)
        return []
    segments, seg, skip = [], [], False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in SEPARATORS:
            segments.append(seg)
            seg = []
        elif tok in REDIRECTS:
            skip = True
        else:
            seg.append(tok)
    segments.append(seg)
    found = []
    for seg in segments:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):  # VAR=value before the command
            seg = seg[1:]
        if seg[:3] == ["ray", "job", "submit"] and "--" in seg:  # ray job submit ... -- raycap ...
            seg = seg[seg.index("--") + 1:]
        if seg and seg[0] == "raycap":
            found.append(("raycap", seg[1:]))
        elif len(seg) >= 3 and re.fullmatch(r"python3?", seg[0]) and seg[1] == "-m" and \
                re.fullmatch(r"raycap(\.\w+)*", seg[2]):
            found.append((seg[2], seg[3:]))
    return found


def doc_commands() -> list[tuple[str, int, str, str, list[str]]]:
    """(file, line number, line, entry, args) of every raycap command in a code block of the README and docs/."""
    out = []
    for path in doc_files():
        for n, line, lang in fenced_lines(path.read_text()):
            for entry, args in commands_in(line, lang):
                out.append((str(path.relative_to(ROOT)), n, line.strip(), entry, args))
    return out


# -- checking one command -------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def parser_of(module: str):
    """The command's own parser, with abbreviated flags refused (argparse would take `--prefix-len` for
    `--prefix-length`; the docs spell every flag out, so a renamed flag cannot hide behind a prefix)."""
    mod = importlib.import_module(module)
    if not hasattr(mod, "build_parser"):  # a package: its entry point is its __main__ module
        mod = importlib.import_module(f"{module}.__main__")
    parser = mod.build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return parser


def _is_path(value: str) -> bool:
    return "/" in value or "." in Path(value).name


def _set_keys(args: list[str]) -> list[str]:
    keys = []
    for i, a in enumerate(args):
        if a == "--set" and i + 1 < len(args):
            keys.append(args[i + 1].split("=", 1)[0])
        elif a.startswith("--set="):
            keys.append(a[len("--set="):].split("=", 1)[0])
    return keys


def check_command(entry: str, args: list[str]) -> str | None:
    """None when the command line is what its command accepts, else why not; "skip" for help lines."""
    from raycap.commands import COMMANDS

    if entry in ("raycap", "raycap.cli", "raycap.__main__"):
        if not args or args[0] in ("-h", "--help"):
            return "skip"
        if args[0] not in COMMANDS:
            return f"unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}"
        name, module, args = args[0], COMMANDS[args[0]][0], args[1:]
    else:
        module = entry
        name = next((n for n, (m, _) in COMMANDS.items() if m == module), None)
        if name is None:
            return f"python -m {module}: not a raycap command module ({', '.join(m for m, _ in COMMANDS.values())})"
    if "-h" in args or "--help" in args:
        return "skip"
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            ns = parser_of(module).parse_args(args)
    except SystemExit as e:
        return " ".join(err.getvalue().split()) or f"argparse exit {e.code}"
    return check_settings(name, ns, args)


def check_settings(name: str, ns, args: list[str]) -> str | None:
    """The `--set` keys, named configs and spaces of a parsed command line; a named run config must load."""
    from raycap.config import RunConfig, check_override_key, load_config, named_configs
    from raycap.data.world import WorldConfig
    from raycap.errors import UserError
    from raycap.search.space import SearchSettings, named_spaces
    from raycap.supervised.captioner_stage import CaptionerStageConfig

    for flag in ("config", "select_config"):
        value = getattr(ns, flag, None)
        if name == "pretrain" or not value or _is_path(value):
            continue
        if value not in named_configs():
            return f"--{flag.replace('_', '-')} {value}: no such named config ({', '.join(named_configs())})"
    space = getattr(ns, "space", None)
    if name == "tune" and space and not _is_path(space) and space not in named_spaces():
        return f"--space {space}: no such named space ({', '.join(named_spaces())})"
    model = {"train": RunConfig, "card": RunConfig, "tune": RunConfig}.get(name)
    if name == "pretrain":
        model = WorldConfig if ns.dataset == "world" else CaptionerStageConfig
    try:
        for key in _set_keys(args):
            if name == "tune" and key.startswith("search."):
                check_override_key(key[len("search."):], SearchSettings)
            elif model is not None:
                check_override_key(key, model)
        config = getattr(ns, "config", None)
        if name in ("train", "card") and config and not _is_path(config):
            load_config(config, ns.set)
    except UserError as e:
        return str(e)
    return None


# -- the tests -------------------------------------------------------------------------------------------------------


def test_readme_is_a_front_page_with_the_test_command():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the depth belongs in docs/"
    assert lines.count(MARKER) == 1, f"README.md needs exactly one {MARKER} line"
    i = lines.index(MARKER)
    # what .ci/run extracts: the one line of the fenced bash block right after the marker
    assert lines[i + 1] == "```bash" and lines[i + 3].startswith("```"), lines[i:i + 4]
    command = lines[i + 2]
    assert "pytest" in command and "pip install '.[test]'" in command, command


def test_readme_links_resolve():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "README.md should link into docs/"
    missing = [x for x in links if not re.match(r"[a-z]+://", x) and not (ROOT / x).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    assert any(x.startswith("docs/") for x in links)


def test_the_checker_finds_commands_and_rejects_what_a_parser_would():
    md = "\n".join([
        "text `raycap train --bogus` outside a block is not checked",
        "```bash",
        "raycap train --config world-demo \\",
        "    --out runs/x     # a comment with --no-such-flag",
        "A=1 python -m raycap.evaluate --captioner runs/x/final --dataset world:val",
        "pip install . && raycap report runs/x",
        "RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \\",
        "    raycap tune --space demo --out runs/t",
        "raycap caption <image-file>",
        "```",
    ])
    found = [c for _, line, lang in fenced_lines(md) for c in commands_in(line, lang)]
    assert found == [("raycap", ["train", "--config", "world-demo", "--out", "runs/x"]),
                     ("raycap.evaluate", ["--captioner", "runs/x/final", "--dataset", "world:val"]),
                     ("raycap", ["report", "runs/x"]),
                     ("raycap", ["tune", "--space", "demo", "--out", "runs/t"])], found
    for entry, args in found:
        assert check_command(entry, args) is None, (entry, args, check_command(entry, args))
    # the same checker must reject what the commands reject: a made-up flag above all
    bad = {
        "raycap train --config world-demo --no-such-flag 3": "unrecognized arguments: --no-such-flag",
        "raycap trian --config world-demo": "unknown command",
        "python -m raycap.evaluate --captioner runs/x/final --decoding nope": "invalid choice",
        "raycap evaluate --dataset world:test": "one of the arguments --captioner --captions is required",
        "raycap data export-world --outdir x": "--out",
        "raycap convert clipcap ckpt.pt --out x --prefix-len 10": "unrecognized arguments",
        "raycap train --set rl.kl_coef=0.3 --out runs/x": "now rl.algorithm.kl_coef",
        "raycap train --config world-demo --set rl.sampling.num_samples=0 --out runs/x": "num_samples",
        "raycap train --config no-such-config --out runs/x": "no such named config",
        "raycap tune --space no-such-space": "no such named space",
        "raycap pretrain world --out x --set n_trian=10": "n_trian",
        "python -m raycap.nonesuch --x": "not a raycap command module",
    }
    for line, why in bad.items():
        (entry, args), = commands_in(line)
        error = check_command(entry, args)
        assert error and error != "skip" and why in error, (line, error)
    assert check_command("raycap", ["train", "--help"]) == "skip"


def test_every_command_line_in_the_readme_and_docs_parses():
    commands = doc_commands()
    files = {f for f, *_ in commands}
    assert len(commands) >= 40 and "README.md" in files and len(files) >= 8, (len(commands), files)
    used = {args[0] if entry == "raycap" and args else entry for _, _, _, entry, args in commands}
    from raycap.commands import COMMANDS

    assert set(COMMANDS) <= used, f"commands the docs never show: {set(COMMANDS) - used}"
    failures = []
    for path, n, line, entry, args in commands:
        error = check_command(entry, args)
        if error and error != "skip":
            failures.append(f"{path}:{n}: {line}\n    {error}")
    assert not failures, "command lines the commands would refuse:\n" + "\n".join(failures)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config_keys() -> list[str]:
    """Every dotted key of the run config: its top-level settings and every field of every section below."""
    from pydantic import BaseModel

    from raycap.config import RunConfig, section_model

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            sub = section_model(field.annotation)
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from walk(sub, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return list(walk(RunConfig, ""))


def test_the_generated_config_reference_lists_every_field():
    from raycap.config import RunConfig

    gen = _generator()
    page = (DOCS / "reference" / "config.md").read_text()
    assert gen.MARKER in page, "docs/reference/config.md lost the marker the reference is generated into"
    text = gen.render()
    keys = run_config_keys()
    sections = [s for s in RunConfig.model_fields if any(k.startswith(s + ".") for k in keys)]
    assert {"data", "retriever", "captioner", "rl", "runtime", "eval"} <= set(sections)
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"fields of the run config missing from the reference: {missing}"
    for section in sections:
        assert f"### `{section}`" in text
    from raycap.data.world import WorldConfig
    from raycap.supervised.captioner_stage import CaptionerStageConfig

    for name in WorldConfig.model_fields:
        assert f"| `{name}` |" in text
    for name in CaptionerStageConfig.model_fields["model"].annotation.model_fields:
        assert f"| `model.{name}` |" in text


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install '.[docs]'; CI installs it with '.[test]')")
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    return out, site


def test_the_docs_build_with_strict(built_site):
    out, site = built_site
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout[-4000:]}{out.stderr[-4000:]}"
    assert (site / "index.html").is_file()
    reference = (site / "reference" / "config" / "index.html").read_text()
    missing = [k for k in run_config_keys() if f"<code>{k}</code>" not in reference]
    assert not missing, f"the built reference page misses: {missing}"
    history = (site / "history" / "index.html").read_text()
    assert "Measured results" in history and "assets/results/" in history  # benchmarks/RESULTS.md, its plots
    assert not list(site.rglob("*.py")), "the docs' Python files are build scripts, not pages"
