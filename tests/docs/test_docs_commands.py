"""Every command example in README.md and docs/ runs as written (issue 34: documentation that cannot drift).

What counts as an example: every line of a fenced ```bash / sh / shell / console block (console: the `$ ` lines),
and the lines of an untagged fenced block that start with a documented command (`medtricks`, `python -m
medtricks` / `benchmarks.`, `mlflow`, `torchrun`); `\\` continuations are joined, `# comments` dropped, `&&` chains
checked part by part. Inline `code` spans are synopses (`medtricks run RECIPE [--set k=v]`, `a|b`), not commands:
a span starting `medtricks X` must name a real command X (and `run|ablate|self-train NAME`, a real recipe), one
starting `python -m MODULE` a module with a parser, and every `--flag` in it must be one of that parser's options.

Each example is checked in the strongest affordable way:
- run for real (slow): docs/getting-started.md's commands, in order, in a copy of the README's working folder
  after the README's quickstart (`medtricks run recipes/quickstart.yaml`) has run there once;
- `medtricks run RECIPE ...`: also with `--dry-run` (a recipe on real data only with MEDTRICKS_REAL_DATA, and its
  data.root must then exist);
- every `medtricks ...`: medtricks.cli.build_parser() parses it with abbreviations off (so every flag exists as
  written), the recipe it names loads with its --set overrides, a --card it names is a shipped card; with
  --allow-plugins / --plugin the same in a child process, next to the plug-in file the page defines;
- `python -m MODULE ...` (benchmarks.*, medtricks.*): the module's own argparse parser, caught before the
  module does any work, parses the arguments and answers --help (no benchmark runs);
- `mlflow ...`: click parses it; `torchrun ...`: torch's launcher parses it, then the medtricks command is checked;
- `pip install`: the extras it names exist in pyproject.toml; `python -m pytest` / `bash .ci/...`: the paths exist.

Placeholders (`<id>`, `RUN_ID`, ...) must be in PLACEHOLDERS, each with what it stands for and its stand-in; an
unknown one fails. Commands no check can reach are in UNCHECKED with the reason. The numbers the pages quote
about shipped recipes are checked against their result files in tests/docs/test_docs_numbers.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from mlflow.cli import cli as mlflow_cli
from torch.distributed.run import get_args_parser as torchrun_parser

from medtricks.cli import build_parser, main
from medtricks.recipe import load_recipe
from medtricks.tricks.registry import allow_plugins, load_plugins

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SHELL_LANGS = {"bash", "sh", "shell", "console"}
DOCUMENTED = re.compile(r"(?:[A-Z_]+=\S*\s+)*(?:medtricks\s|python -m (?:medtricks|benchmarks\.)|mlflow\s|torchrun\s)")
RUN_STANDIN = "20260101-000000-abc123"  # a run folder's name, runs/<experiment>/<time>-<id>
RUN_ID_STANDIN = "0123456789abcdef0123456789abcdef"  # an MLflow run id
FROZEN224 = (
    "data.image_size=224+model.freeze=[0,1,2,3,4]+train.cache_frozen={views: 4, dtype: float16}"
    "+train.channels_last=true"
)

# token -> (what it stands for, stand-in for the parse checks). In the run-for-real checks the run placeholders
# (RUN_TOKENS) become the quickstart's run folder instead.
PLACEHOLDERS = {
    "<id>": ("a run folder's name: runs/<experiment>/<id>", RUN_STANDIN),
    "<stamp>": ("a run folder's name (as <id>)", RUN_STANDIN),
    "<id0>": ("a first run folder's name", RUN_STANDIN),
    "<id1>": ("a second run folder's name", RUN_STANDIN.replace("abc", "def")),
    "<run id>": ("an MLflow run id", RUN_ID_STANDIN),
    "<run-id>": ("an MLflow run id", RUN_ID_STANDIN),
    "<other-run-id>": ("another MLflow run id (a surrogate model)", RUN_ID_STANDIN[::-1]),
    "<ablation>": ("an ablation's folder under runs/<experiment>/", "ablation-20260101"),
    "<child>": ("one child run's folder of that ablation", "baseline-s0"),
    "RUN_ID": ("an MLflow run id", RUN_ID_STANDIN),
    "RUN": ("a run folder or run id", f"runs/quickstart/{RUN_STANDIN}"),
    "OUT": ("an output folder of your choosing", "out"),
    "PASSWORD": ("the database user's password", "secret"),
    "FROZEN224": ("the trick bundle the block spells out in its comment (its list holds commas)", FROZEN224),
}
RUN_TOKENS = ("<id>", "<stamp>")
# Absolute paths stand for the reader's own folders; these prefixes are the accepted ones.
USER_PATHS = ("/data/", "/path/to/", "/srv/", "/shared/", "/tmp/")
# Commands no check can reach, with the reason.
UNCHECKED = {
    "sudo": "installs and configures PostgreSQL on the reader's server (root, a database)",
    "curl": "talks to a running `mlflow models serve`; its request body is elided (`...`)",
}
# The path placeholders a real-data dry run maps onto MEDTRICKS_REAL_DATA.
REAL_DATA_PATHS = {"/path/to/kermany": "kermany224", "../shared/data": ""}


@pytest.fixture(autouse=True)
def _in_the_checkout(monkeypatch):
    """The examples are written for the checkout's root (`recipes/...`, `.ci/...`), the README's working folder."""
    monkeypatch.chdir(ROOT)


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    text: str  # as written, continuations joined, comment dropped

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _drop_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def page_examples(page: Path) -> list[Example]:
    text, found = page.read_text(), []
    for block in FENCE.finditer(text):
        lang, lines = block.group(1), block.group(2).splitlines()
        if lang not in SHELL_LANGS and lang != "":
            continue
        first, i = text.count("\n", 0, block.start(2)) + 1, 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            command = _drop_comment(line).strip()
            if command and (lang or DOCUMENTED.match(command)):
                found.append(Example(str(page.relative_to(ROOT)), first + start, command))
    return found


EXAMPLES = [example for page in PAGES for example in page_examples(page)]


def substitute(text: str, replacements: dict[str, str]) -> str:
    for token, value in replacements.items():
        pattern = rf"(?<![\w$]){re.escape(token)}(?!\w)"
        text = text.replace(token, value) if token.startswith("<") else re.sub(pattern, lambda _: value, text)
    return text


def unknown_placeholders(text: str) -> list[str]:
    text = re.sub(r"^(?:export\s+)?(?:[A-Z_]+=\S*\s*)+|\$\{?\w+\}?", "", text)  # variables are shell's
    return re.findall(r"<[^<>]+>", text) + re.findall(r"(?<![\w$])[A-Z][A-Z0-9_]+(?!\w)", text)


def commands(text: str) -> list[list[str]]:
    """The `&&` parts of a command line as argv lists."""
    parts, current = [], []
    for token in shlex.split(text):
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [*parts, current]


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, value = argv[0].split("=", 1)
        env[name], argv = value, argv[1:]
    return env, argv


def _without_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _without_abbreviations(sub)
    return parser


def parse_or_fail(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return _without_abbreviations(parser).parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{what} does not parse (exit {exc.code}): {err.getvalue().strip()}")


def _card_exists(card: str) -> bool:
    return (ROOT / "data_cards" / f"{card}.yaml").is_file() or Path(card).is_file()


def check_medtricks(argv: list[str]) -> argparse.Namespace:
    """Parse with the real parser; load the recipe it names with its overrides; the card it names exists."""
    args = parse_or_fail(build_parser(), argv, f"medtricks {' '.join(argv)}")
    assert args.command, "no medtricks command"
    if getattr(args, "recipe", None):
        load_recipe(args.recipe, overrides=getattr(args, "overrides", []))
    if getattr(args, "card", None):
        assert _card_exists(args.card), f"--card {args.card}: no such data card in data_cards/"
    return args


class _Parsed(Exception):
    """Raised in place of the first parse of a `python -m MODULE` run: its parser, before any work."""

    def __init__(self, parser):
        self.parser = parser


def module_parser(module: str) -> argparse.ArgumentParser:
    """The argparse parser `python -m module` builds, caught at its first parse (the module does no work)."""

    def catch(parser, *args, **kwargs):
        raise _Parsed(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        patch.setattr(sys, "argv", [module])
        patch.delitem(sys.modules, module, raising=False)  # imported already: run it afresh, as `python -m` does
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        except _Parsed as caught:
            return caught.parser
    pytest.fail(f"python -m {module} finished without parsing a command line")


def check_python_module(module: str, args: list[str]) -> None:
    parser = module_parser(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        parser.parse_args(["--help"])
    assert exited.value.code == 0 and "usage:" in out.getvalue(), f"python -m {module} --help"
    parse_or_fail(parser, args, f"python -m {module} {' '.join(args)}")


def check_mlflow(args: list[str]) -> None:
    command, name, ctx = mlflow_cli, "mlflow", None
    try:
        while True:
            ctx = command.make_context(name, args, parent=ctx)
            if not isinstance(command, click.Group):
                return
            name, command, args = command.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
    except click.ClickException as err:
        pytest.fail(f"mlflow {name}: {err.format_message()}")


def check_torchrun(args: list[str]) -> None:
    launch = parse_or_fail(torchrun_parser(), args, f"torchrun {' '.join(args)}")
    assert launch.module and launch.training_script == "medtricks", "torchrun examples launch -m medtricks"
    check_medtricks(launch.training_script_args)


def check_pip(args: list[str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in args:
        match = re.fullmatch(r"(?:medtricks|\.)\[([\w,-]+)\]", spec)
        for extra in match.group(1).split(",") if match else ():
            assert extra in extras, f"pip install {spec}: pyproject.toml has no extra {extra!r}"


def check_scripts(args: list[str]) -> None:
    for arg in args:
        if arg.startswith(".ci/") or arg.startswith("tests/"):
            assert (ROOT / arg).exists(), f"{arg} does not exist"


def plugin_example(argv: list[str]) -> bool:
    return argv[:1] == ["medtricks"] and any(a in ("--allow-plugins", "--plugin") for a in argv)


def check_argv(argv: list[str], variables: dict[str, str]) -> str:
    """Check one command (an `&&` part); return how it was checked, or raise."""
    env, argv = split_env(argv)
    if not argv or argv[0] == "export":  # a shell variable: later lines of the block may use it
        variables.update(env or dict(a.split("=", 1) for a in argv[1:]))
        return "variable"
    head, rest = argv[0], argv[1:]
    if head == "medtricks":
        check_medtricks(rest)
    elif argv[:3] == ["python", "-m", "medtricks"]:
        check_medtricks(argv[3:])
    elif argv[:3] == ["python", "-m", "pytest"]:
        check_scripts(argv[3:])
    elif argv[:2] == ["python", "-m"]:
        check_python_module(argv[2], argv[3:])
    elif head == "mlflow":
        check_mlflow(rest)
    elif head == "torchrun":
        check_torchrun(rest)
    elif argv[:2] == ["pip", "install"]:
        check_pip(argv[2:])
    elif head == "bash":
        check_scripts(rest)
    elif head == "mkdir":
        return "shell: makes a folder"
    elif head == "eval" and rest and rest[0].startswith("$(") and rest[0].endswith(")"):
        for inner in commands(rest[0][2:-1]):
            check_argv(inner, variables)
    elif head in UNCHECKED:
        return f"unchecked: {UNCHECKED[head]}"
    else:
        pytest.fail(f"no rule checks `{head}`: add one, or an UNCHECKED entry with the reason")
    return "checked"


def _prepared(example: Example, variables: dict[str, str]) -> str:
    text = substitute(example.text, {f"${name}": value for name, value in variables.items()})
    unknown = unknown_placeholders(substitute(text, {t: v for t, (_, v) in PLACEHOLDERS.items()}))
    assert not unknown, f"{example}: unknown placeholders {unknown}: add them to PLACEHOLDERS with a stand-in"
    text = substitute(text, {t: v for t, (_, v) in PLACEHOLDERS.items()})
    for token in shlex.split(text):
        path = token.split("=", 1)[-1]
        assert not path.startswith("/") or path.startswith(USER_PATHS), f"{example}: {path} is not in USER_PATHS"
    return text


def _block_variables(example: Example) -> dict[str, str]:
    """Shell variables set earlier on the same page (`S=...`), for `$S` in this example."""
    variables: dict[str, str] = {}
    for earlier in EXAMPLES:
        if earlier.page == example.page and earlier.line < example.line:
            env, argv = split_env(shlex.split(earlier.text))
            if env and not argv:
                variables.update(env)
    return variables


@pytest.mark.parametrize("example", [e for e in EXAMPLES if not plugin_example(shlex.split(e.text))], ids=str)
def test_every_command_example_parses_and_names_what_exists(example):
    variables = _block_variables(example)
    for argv in commands(_prepared(example, variables)):
        check_argv(argv, variables)


def _medtricks_argv(text: str) -> list[str]:
    """The medtricks command of an example line, also when torchrun launches it."""
    argv = split_env(shlex.split(text))[1]
    return ["medtricks", *argv[argv.index("medtricks") + 1 :]] if argv[:1] == ["torchrun"] else argv


def _run_examples() -> list[Example]:
    stand_ins = {t: v for t, (_, v) in PLACEHOLDERS.items()}
    return [
        e
        for e in EXAMPLES
        if (argv := _medtricks_argv(substitute(e.text, stand_ins)))[:2] == ["medtricks", "run"]
        and not plugin_example(argv)
    ]


def _real_data(text: str) -> str:
    root = os.environ.get("MEDTRICKS_REAL_DATA", "")
    for placeholder, sub in REAL_DATA_PATHS.items():
        text = text.replace(placeholder, str(Path(root) / sub) if sub else root)
    return text


@pytest.mark.parametrize("example", _run_examples(), ids=str)
def test_run_examples_resolve_with_dry_run(example, capsys):
    argv = _medtricks_argv(_prepared(example, _block_variables(example)))
    args = check_medtricks(argv[1:])
    if load_recipe(args.recipe, overrides=args.overrides).data.synth is None:  # real data
        if not os.environ.get("MEDTRICKS_REAL_DATA"):
            pytest.skip("a real-data recipe: set MEDTRICKS_REAL_DATA=../shared/data to dry-run it")
        argv = shlex.split(_real_data(shlex.join(argv)))
        args = check_medtricks(argv[1:])
        root = Path(_real_data(str(load_recipe(args.recipe, overrides=args.overrides).data.root)))
        assert root.exists(), f"{example}: its data.root {root} does not exist"
    assert main([*argv[1:], "--dry-run"]) == 0
    assert "experiment:" in capsys.readouterr().out


def _page_files(page: str, workdir: Path) -> None:
    """Write the page's ```python blocks that open with `# NAME.py` (files its commands use) into workdir."""
    for block in FENCE.finditer((ROOT / page).read_text()):
        first = block.group(2).splitlines()[0] if block.group(2) else ""
        if block.group(1) == "python" and re.fullmatch(r"# [\w.]+\.py", first):
            (workdir / first[2:]).write_text(block.group(2))


def _check_in_child(argv_list: list[list[str]]) -> list[str]:
    """Run in a child process: plug-ins register tricks process-wide. One error message (or '') per argv."""
    errors = []
    for argv in argv_list:
        try:
            args = parse_or_fail(build_parser(), argv, "medtricks " + " ".join(argv))
            if getattr(args, "allow_plugins", False):
                allow_plugins()
            if getattr(args, "plugin", None):
                load_plugins(args.plugin)
            check_medtricks(argv)
            errors.append("")
        except BaseException as err:  # noqa: BLE001 - reported to the parent test
            errors.append(f"{type(err).__name__}: {err}")
    return errors


def test_plugin_examples_load_the_plugin_the_page_defines(tmp_path):
    plugin = [e for e in EXAMPLES if plugin_example(shlex.split(e.text))]
    assert plugin, "no page shows a plug-in example any more: remove this test"
    for page in {e.page for e in plugin}:
        _page_files(page, tmp_path)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    argvs = [shlex.split(_prepared(e, {}))[1:] for e in plugin]
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'tests' / 'docs')!r}); import test_docs_commands as t; "
        f"print(json.dumps(t._check_in_child(json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "MEDTRICKS_ALLOW_PLUGINS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argvs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f"{e}: {err}" for e, err in zip(plugin, errors) if err] == []


SYNOPSIS = re.compile(r"`((?:medtricks|python -m [a-z][\w.]*)(?: [^`]*)?)`")
RECIPE_COMMANDS = ("run", "ablate", "self-train")


def _synopsis_parser(words: list[str], medtricks: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser a synopsis's words name: medtricks, one of its (sub)commands, or a `python -m` module's."""
    if words[0] == "python":
        return _without_abbreviations(module_parser(words[2]))
    if len(words) == 1 or words[1].startswith("-"):  # `medtricks --help`
        return medtricks
    command = medtricks._subparsers._group_actions[0].choices.get(words[1])
    assert command is not None, f"no command {words[1]!r}"
    subs = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
    if subs and len(words) > 2 and words[2] in subs[0].choices:
        command = subs[0].choices[words[2]]
    if words[1] in RECIPE_COMMANDS and len(words) > 2 and re.fullmatch(r"[a-z0-9_.][a-z0-9_./-]*", words[2]):
        load_recipe(words[2])  # a shipped recipe's name or path, not a placeholder
    return command


def test_inline_synopses_name_real_commands_and_flags():
    medtricks, problems = _without_abbreviations(build_parser()), []
    for page in PAGES:
        for span in SYNOPSIS.findall(FENCE.sub("", page.read_text())):
            if span.startswith("python -m pytest"):
                continue  # the test suite: its paths are checked where the pages give them in a block
            try:
                command = _synopsis_parser(span.replace("\\|", "|").split(), medtricks)
            except Exception as err:  # noqa: BLE001 - listed below with the span
                problems.append(f"{page.name}: `{span}`: {err}")
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span):
                if flag not in command._option_string_actions:
                    problems.append(f"{page.name}: `{span}`: {flag} is not an option of {command.prog}")
    assert problems == []


def test_placeholders_and_unchecked_commands_are_used():
    """The lists stay short: an entry no page uses any more is removed."""
    text = " ".join(e.text for e in EXAMPLES)
    assert [t for t in PLACEHOLDERS if not re.search(rf"(?<![\w$]){re.escape(t)}(?!\w)", text)] == []
    assert [c for c in UNCHECKED if not re.search(rf"(^|&& ){c} ", "\n".join(e.text for e in EXAMPLES), re.M)] == []


README_QUICKSTART = ["medtricks", "run", "recipes/quickstart.yaml"]


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory, mlflow_template):
    """A copy of the README's working folder (the checkout's recipes/) where the README's quickstart ran once,
    with MLflow's default store there (no MLFLOW_TRACKING_URI): (folder, run folder, seconds it took)."""
    readme = [argv for e in EXAMPLES if e.page == "README.md" for argv in commands(e.text)]
    assert README_QUICKSTART in readme, "the README no longer runs the quickstart as this test expects"
    folder = tmp_path_factory.mktemp("readme-folder")
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    shutil.copy(mlflow_template, folder / "mlflow.db")  # an empty, migrated store: skips ~10 s of migrations
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MEDTRICKS_CACHE", str(folder / ".cache"))
        started = time.perf_counter()
        assert main(README_QUICKSTART[1:]) == 0
        seconds = time.perf_counter() - started
    (run,) = sorted((folder / "runs" / "quickstart").iterdir())
    return folder, run, seconds


@pytest.mark.slow
def test_getting_started_commands_run_for_real_after_the_quickstart(readme_folder, monkeypatch):
    """docs/getting-started.md's commands, in order, on the quickstart's run (`<id>` = its folder's name)."""
    folder, run, _ = readme_folder
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(folder / ".cache"))
    ran, timings = [], {}
    for example in (e for e in EXAMPLES if e.page == "docs/getting-started.md"):
        text = _prepared(
            Example(example.page, example.line, substitute(example.text, dict.fromkeys(RUN_TOKENS, run.name))), {}
        )
        for argv in commands(text):
            env, argv = split_env(argv)
            if argv[:2] == ["mkdir", "-p"]:
                for path in argv[2:]:
                    Path(path).mkdir(parents=True, exist_ok=True)
            elif argv[:1] == ["medtricks"] and argv != README_QUICKSTART:  # the fixture ran the quickstart
                started = time.perf_counter()
                assert main(argv[1:]) == 0, f"{example} failed"
                timings[" ".join(argv[:2])] = round(time.perf_counter() - started, 1)
                ran.append(argv[1])
    # pip, pytest and `mlflow ui` (a server) are checked by the parse test; these are the ones that act on the run
    assert {"evaluate", "predict", "export", "audit"} <= set(ran), ran
    assert (folder / "preds.csv").is_file() and (folder / "exports" / "quickstart.onnx").is_file()
    print(f"quickstart {readme_folder[2]:.0f} s; {timings}")
