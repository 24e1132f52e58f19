"""README.md and docs/*.md against the code, so that the documentation cannot rot unnoticed:

- every relative link (and its #section, in a Markdown page) and every backticked path into the source folders
  exists;
- every `python X.py ...` / `python -m M ...` command line of the project's own commands, in a shell code block
  or a backticked span, is accepted by that command's parser, which is built but never run
  (tools.flag_tables.parser_of); placeholders (DATA, <run>, $VAR, {split}, ...) stand for any value;
- every backticked `module.name` / `Class.method` of the project's modules resolves (the module imported, the
  attribute looked up), and every import in a Python code block resolves;
- the flag tables written from the parsers are current (python -m tools.flag_tables rewrites them).

The checker functions return the problems they find as lines; the last tests plant a broken link, an unknown flag
and a stale reference and check that each is reported.
"""
import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from tools import flag_tables

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# backticked paths are checked under these folders; others are written by the commands (checkpoints/demo,
# demo_data/training_label.json, out.txt) or lie outside the checkout (../shared)
SOURCE_FOLDERS = ("util", "tools", "tests", "docs", ".ci", "raw_videos")
SOURCE_SUFFIXES = (".py", ".sh", ".md", ".toml")
# a dotted name that ends like these is a file name (model.weights.h5, config.json), not a code reference
FILE_SUFFIXES = {"py", "json", "txt", "h5", "csv", "png", "npy", "md", "sh", "gz", "avi", "mp4", "webm", "srt", "vtt",
                 "toml", "html", "index", "whl", "yaml", "lock"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", ""}
PYTHON = re.compile(r"^(\S*/)?python3?(\.\d+)?$")
# a value that stands for any: <run>, $VAR, {split}, *.avi, ..., or starting with a word in capitals (DATA/x, N, I/N)
PLACEHOLDER = re.compile(r"[<>${}*]|\.\.\.|^-?[A-Z][A-Z0-9_]*(?![a-z])")
VARIABLE = re.compile(r"\$\{(\w+)(?:/([^/}]*)/([^}]*))?\}|\$(\w+)")


# ---- reading a page ----

def fenced_blocks(text):
    """[(language, code)] of a page's fenced code blocks, and the page's text with them blanked out."""
    blocks, prose, inside, language, lines = [], [], False, "", []
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and not inside:
            inside, language, lines = True, fence.group(1), []
        elif fence:
            inside = False
            blocks.append((language, "\n".join(lines)))
        elif inside:
            lines.append(line)
        prose.append("" if inside or fence else line)
    return blocks, "\n".join(prose)


def code_spans(prose):
    """The backticked spans of a page's prose, a span broken over lines joined by one space; `\\|` (a `|` inside a
    table cell) read as `|`."""
    return [" ".join(span.replace("\\|", "|").split()) for span in re.findall(r"`([^`]+)`", prose)]


def links(prose):
    """The targets of a page's Markdown links and images, code spans left out."""
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", prose))


def anchors(page):
    """The #fragments GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens, a repeated
    heading numbered."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", fenced_blocks(page.read_text(encoding="utf-8"))[1], re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


# ---- (a) links and paths ----

def link_problems(page, prose):
    problems = []
    for target in links(prose):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: link to {target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            problems.append(f"{page.name}: link to {target}: no section #{fragment} in {file.name}")
    return problems


def is_source_path(span):
    """A backticked span that names a file of the checkout: under a source folder, or a script at the root."""
    if " " in span or PLACEHOLDER.search(span.split("::")[0]) or span.startswith(("-", "/", "~", "..")):
        return False
    first = span.split("/")[0]
    return ("/" in span and first in SOURCE_FOLDERS) or ("/" not in span and span.endswith(SOURCE_SUFFIXES))


def path_problems(page, spans):
    problems = []
    for span in filter(is_source_path, spans):
        path, _, test = span.partition("::")
        if not (ROOT / path).exists():
            problems.append(f"{page.name}: `{span}`: no such file")
        elif test and test not in function_names(ROOT / path):
            problems.append(f"{page.name}: `{span}`: {path} has no {test}")
    return problems


@cache
def function_names(path):
    return {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


# ---- (b) command lines ----

def expand(line, variables):
    """A shell line with the variables this page set expanded (${VAR/old/new} too); unknown ones stay."""
    def value(match):
        name = match.group(1) or match.group(4)
        if name not in variables:
            return match.group(0)
        text = variables[name]
        return text.replace(match.group(2), match.group(3), 1) if match.group(2) is not None else text
    return VARIABLE.sub(value, line)


def shell_commands(code, variables, separators="();<>|&"):
    """The simple commands of a shell block as token lists: continuations joined, comments dropped, variable
    assignments remembered in `variables` (shared by a page's blocks, as in one shell session), split at
    ; && || | & (of `separators`), redirections dropped."""
    commands = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        line = re.sub(r"(^|\s)#.*", "", expand(line, variables))
        line = re.sub(r"<([\w.:-]+)>", r"{\1}", line)  # <run>: a placeholder, not a redirection
        lexer = shlex.shlex(line, posix=True, punctuation_chars=separators)
        lexer.whitespace_split = True
        command = []
        for token in [*lexer, ";"]:
            if token not in (";", "&&", "||", "|", "&"):
                command.append(token)
                continue
            words = command[1:] if command[:1] == ["export"] else command
            if words and all(re.match(r"^\w+=", word) for word in words):  # A=1 alone sets it for the lines below
                variables.update(word.split("=", 1) for word in words)
            elif command:
                commands.append(drop_redirections(command))
            command = []
    return commands


def drop_redirections(tokens):
    kept, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in (">", ">>", "<", ">&", "2>"):
            skip = True
        else:
            kept.append(token)
    return kept


def python_invocation(tokens):
    """(command, arguments) of a `python X.py ...` or `python -m M ...` found in a simple command (after env
    assignments, nice, time, do, ...), or None."""
    start = next((i for i, token in enumerate(tokens) if PYTHON.match(token)), None)
    if start is None or start + 1 >= len(tokens):
        return None
    rest = tokens[start + 1:]
    if rest[0] == "-m" and len(rest) > 1:
        return rest[1], rest[2:]
    if rest[0].endswith(".py"):
        return rest[0], rest[1:]
    return None


def is_ours(command):
    """A command of this checkout: a script at its root or a module of it (pytest, pip and venv are not)."""
    module = flag_tables.module_of(command)
    return (ROOT / (module.replace(".", "/") + ".py")).exists() or command.endswith(".py")


def usage_words(arguments):
    """The arguments of a usage line as a shell would pass them: [optional] brackets and ... repeats dropped,
    unknown $VARIABLES (a page's other flags) left out."""
    words = [word.strip("[]") for word in arguments]
    return [word for word in words if word and word != "..." and not re.fullmatch(r"\$\{?\w+\}?", word)]


def accepts_placeholders(parser):
    """Let placeholder values (DATA, {run}, $s, a|b of valid values) through every type and choices check of a
    parser and its subcommands'."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                accepts_placeholders(subcommand)
            continue
        if action.choices is not None:
            action.choices = PlaceholderChoices(action.choices)
        if action.type is not None:
            action.type = lenient(action.type)
    return parser


def is_placeholder(value):
    return isinstance(value, str) and bool(PLACEHOLDER.search(value))


def lenient(convert):
    """A flag type that passes a placeholder through, and checks each alternative of a|b (--batch-size 50|250)."""
    def converted(value):
        return value if is_placeholder(value) else [convert(part) for part in value.split("|")][0]
    converted.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error
    return converted


class PlaceholderChoices(list):
    """Choices that also hold any placeholder, and a|b when they hold both a and b."""

    def __contains__(self, value):
        return is_placeholder(value) or all(super(PlaceholderChoices, self).__contains__(part)
                                            for part in str(value).split("|"))


@cache
def checking_parser(command):
    return accepts_placeholders(flag_tables.parser_of(command))


def command_problem(command, arguments, complete=True):
    """Why the command's parser refuses these arguments (its error line), or None. A command mentioned in prose
    (complete=False: `python -m tools.datasets`) may leave out its required arguments."""
    name = f"python {command}" if command.endswith(".py") else f"python -m {command}"
    if command.endswith(".py") and not (ROOT / command).exists():
        return f"{name}: no such script"
    parser = checking_parser(command)
    words = usage_words(arguments)
    known = {option for action in all_actions(parser) for option in action.option_strings}
    for word in words:  # argparse takes --epo for --epochs: the docs name each flag in full
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            return f"{name}: unrecognized flag {flag}"
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(words)
        except SystemExit as stop:
            error = errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1] if stop.code else ""
            if error and (complete or "the following arguments are required" not in error):
                return f"{name}: {error}"
    return None


def all_actions(parser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                yield from all_actions(subcommand)


def documented_commands(page):
    """[(where, command, arguments, complete)]: the project's command lines in the page's shell blocks (complete)
    and backticked spans (perhaps a mention)."""
    blocks, prose = fenced_blocks(page.read_text(encoding="utf-8"))
    variables, found = {}, []
    for language, code in blocks:
        if language in SHELL_LANGUAGES:
            found += [(f"{page.name} (code block)", *invocation, True)
                      for invocation in map(python_invocation, shell_commands(code, variables)) if invocation]
    for span in code_spans(prose):
        if re.match(r"^(\w+=\S+ )*(\S*/)?python3? ", span):
            # a span's | separates alternatives (--what train|infer), not a pipe
            for tokens in shell_commands(span, dict(variables), separators="();<>&"):
                if invocation := python_invocation(tokens):
                    found.append((f"{page.name} (`{span}`)", *invocation, False))
    return [found_command for found_command in found if is_ours(found_command[1])]


def command_problems(page):
    return [f"{where}: {problem}" for where, command, arguments, complete in documented_commands(page)
            if (problem := command_problem(command, arguments, complete))]


# ---- (c) code references ----

@cache
def project_modules():
    files = list(ROOT.glob("*.py")) + list(ROOT.glob("util/*.py")) + list(ROOT.glob("tools/*.py"))
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


@cache
def classes():
    """{class name: module} for the classes defined at the top of exactly one project module."""
    found = {}
    for module, path in project_modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(module)
    return {name: modules[0] for name, modules in found.items() if len(modules) == 1}


def reference_problem(span):
    """Why a backticked `module.name` or `Class.name` of the project does not resolve, or None (also None for
    what is not such a reference: file names, other libraries' names, expressions). A module may be named by its
    last part where one module has it (`releases.fetch_release` for util.releases)."""
    name = re.sub(r"\(.*\)$", "", span)
    parts = name.split(".")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", name) or parts[-1] in FILE_SUFFIXES:
        return None
    modules = project_modules()
    if parts[0] not in modules and parts[0] in short_names():
        parts = short_names()[parts[0]].split(".") + parts[1:]
    elif parts[0] not in modules and parts[0] in classes():
        parts = classes()[parts[0]].split(".") + parts
    module_name = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                       None)
    if module_name is None:
        return None
    target, path = importlib.import_module(module_name), module_name
    for attribute in parts[len(module_name.split(".")):]:
        if not hasattr(target, attribute):
            return f"`{span}`: {path} has no {attribute}"
        target, path = getattr(target, attribute), f"{path}.{attribute}"
    return None


@cache
def short_names():
    """{last part: module} for the util/ and tools/ modules whose last part no other module has."""
    lasts = [module.split(".")[-1] for module in project_modules()]
    return {module.split(".")[-1]: module for module in project_modules()
            if "." in module and lasts.count(module.split(".")[-1]) == 1}


def import_problems(code):
    """The imports of a Python code block that name a project module or name it lacks."""
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module in project_modules():
            problems += [problem for alias in node.names
                         if (problem := reference_problem(f"{node.module}.{alias.name}"))]
        elif isinstance(node, ast.Import):
            problems += [f"import {alias.name}: no such module" for alias in node.names
                         if alias.name.split(".")[0] in {m.split(".")[0] for m in project_modules()}
                         and alias.name not in project_modules()]
    return problems


def reference_problems(page):
    blocks, prose = fenced_blocks(page.read_text(encoding="utf-8"))
    problems = [f"{page.name}: {problem}" for span in code_spans(prose) if (problem := reference_problem(span))]
    for language, code in blocks:
        if language == "python":
            problems += [f"{page.name} (python block): {problem}" for problem in import_problems(code)]
    return problems


# ---- the tests ----

@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_and_paths_exist(page):
    _, prose = fenced_blocks(page.read_text(encoding="utf-8"))
    assert link_problems(page, prose) + path_problems(page, code_spans(prose)) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_documented_command_lines_parse(page):
    assert command_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_code_references_resolve(page):
    assert reference_problems(page) == []


def test_the_flag_tables_are_current():
    assert [page.name for page in flag_tables.stale_pages(ROOT)] == [], "run python -m tools.flag_tables"


def test_every_page_is_linked_from_the_readme_or_another_page():
    linked = {(page.parent / target.split("#")[0]).resolve() for page in PAGES
              for target in links(fenced_blocks(page.read_text(encoding="utf-8"))[1])}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_the_code_names_only_files_that_exist():
    """Comments and messages in the code that point to a test or a docs page (tests/test_x.py, docs/x.md)."""
    named = {(path.relative_to(ROOT), target) for path in project_modules().values()
             for target in re.findall(r"\b((?:tests|docs)/[\w/]+\.(?:py|md))", path.read_text(encoding="utf-8"))}
    assert sorted((str(path), target) for path, target in named if not (ROOT / target).exists()) == []


# ---- the checks catch what they are for ----

def planted(tmp_path, text):
    page = tmp_path / "planted.md"
    page.write_text(text, encoding="utf-8")
    return page


def test_a_broken_link_and_a_missing_path_are_reported(tmp_path):
    page = planted(tmp_path, "See [the guide](docs/nowhere.md), [a section](#nowhere) and `tests/test_kernels.py`.\n"
                             "# Here\n[fine](#here)\n")
    _, prose = fenced_blocks(page.read_text())
    assert link_problems(page, prose) == ["planted.md: link to docs/nowhere.md: no such file",
                                          "planted.md: link to #nowhere: no section #nowhere in planted.md"]
    assert path_problems(page, code_spans(prose)) == ["planted.md: `tests/test_kernels.py`: no such file"]
    assert path_problems(page, ["tests/test_extract.py::no_such_test", "checkpoints/<run>/curves.png", "DATA/x"]) == [
        "planted.md: `tests/test_extract.py::no_such_test`: tests/test_extract.py has no no_such_test"]


def test_an_unknown_flag_or_a_bad_value_is_reported(tmp_path):
    page = planted(tmp_path, "```bash\n"
                             "FLAGS=\"--frames 12 --hidden 128\"\n"
                             "KERAS_BACKEND=jax .venv/bin/python train.py --data-dir DATA $FLAGS \\\n"
                             "  --no-such-flag 3   # a comment\n"
                             "nice -n 19 python train.py --data-dir <data> ${FLAGS/--frames 12/--frames x}\n"
                             "python infer.py ids.txt out.txt --checkpoint checkpoints/<run> --beam-size 5 && "
                             "python -m util.evaluate out.txt --labels labels.json\n"
                             "for s in a b; do python extract_features.py v/${s} f/${s} --stream flow --pool nope; "
                             "done\n"
                             "python -m pytest -q tests --anything\n"
                             "```\n"
                             "Also `python -m tools.release download NAME|URL [--sha256 HEX] [--wrong]` and "
                             "`python bench.py --what train|infer --runs 3`.\n")
    assert command_problems(page) == [
        "planted.md (code block): python train.py: unrecognized flag --no-such-flag",
        "planted.md (code block): python train.py: argument --frames: invalid positive_int value: 'x'",
        "planted.md (code block): python extract_features.py: argument --pool: invalid choice: 'nope' (choose from "
        "'avg', 'max', 'avg+max')",
        "planted.md (`python -m tools.release download NAME|URL [--sha256 HEX] [--wrong]`): python -m tools.release: "
        "unrecognized flag --wrong"]


def test_a_stale_code_reference_is_reported(tmp_path):
    page = planted(tmp_path, "`util.backend.host_scores`, `Captioner.load(run)`, `decoding.Constraints`, "
                             "`model.weights.h5`, `keras.ops.custom_gradient`, `util.backend.no_such_function`, "
                             "`Captioner.no_such_method`, `releases.resolve_checkpoint`\n"
                             "```python\nfrom captioner import Captioner, Missing\n```\n")
    assert reference_problems(page) == ["planted.md: `util.backend.no_such_function`: util.backend has no "
                                        "no_such_function",
                                        "planted.md: `Captioner.no_such_method`: captioner.Captioner has no "
                                        "no_such_method",
                                        "planted.md (python block): `captioner.Missing`: captioner has no Missing"]
