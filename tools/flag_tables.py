"""The flag tables in docs/, written from the commands' own argparse parsers (what --help prints), never by hand.

    python -m tools.flag_tables            rewrite every generated table in docs/*.md
    python -m tools.flag_tables --check    list the tables that are out of date (exit status 1), change nothing

A page asks for a table with a pair of markers; whatever lies between them is replaced:

    <!-- flags of train.py: written by python -m tools.flag_tables, do not edit -->
    <!-- end of flags -->

`parser_of` gives a command's parser without running the command (tests/test_docs.py checks the documented
command lines with it): a module's build_parser() where it has one; otherwise its main([]) is called with
argparse's parse_known_args replaced by a stop that hands back the parser it was called on, so nothing past
building the parser runs.
"""
import argparse
import importlib
import re
import sys
from pathlib import Path
from unittest import mock

from util.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"(<!-- flags of (?P<command>\S+): written by python -m tools\.flag_tables, do not edit -->\n)"
                    r".*?(<!-- end of flags -->)", re.S)


class ParserBuilt(BaseException):
    """Raised from inside a main() to carry its parser out (a BaseException: a main's `except Exception` lets it
    through)."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def module_of(command):
    """The module a command runs: train.py -> train, util/evaluate.py or util.evaluate -> util.evaluate."""
    return command.removesuffix(".py").replace("/", ".")


def parser_of(command):
    """The argparse parser of a command (`train.py`, `util.evaluate`), built but not run."""
    module = importlib.import_module(module_of(command))
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def stop(parser, *args, **kwargs):
        raise ParserBuilt(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop):
        try:
            module.main([])
        except ParserBuilt as built:
            return built.parser
    raise LookupError(f"{command}: main() parsed no arguments")


def cell(text):
    """Text safe in a Markdown table cell: no column breaks, no angle brackets taken for HTML."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def flag_column(action):
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    value = "|".join(map(str, action.choices)) if action.choices else action.metavar or action.dest.upper()
    return f"{names} {cell(value)}"


def default_column(action):
    if action.required:
        return "(required)"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS, []):
        return ""
    return f"`{cell(action.default)}`"


def flag_table(parser):
    """One row per option (positional arguments and -h left to --help): the flag, its default, its help."""
    formatter = parser._get_formatter()  # argparse's own %(default)s expansion of a help text
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        help_text = formatter._expand_help(action) if action.help else ""
        rows.append(f"| {flag_column(action)} | {default_column(action)} | {cell(help_text)} |")
    return "\n".join(rows) + "\n"


def regenerated(text):
    """A page's text with every marked table written afresh."""
    return MARKER.sub(lambda m: m.group(1) + flag_table(parser_of(m.group("command"))) + m.group(3), text)


def stale_pages(root=ROOT):
    """{page: its text with current tables} for the pages under docs/ whose tables are out of date."""
    pages = {page: page.read_text(encoding="utf-8") for page in sorted((root / "docs").glob("*.md"))}
    fresh = {page: regenerated(text) for page, text in pages.items() if MARKER.search(text)}
    return {page: text for page, text in fresh.items() if text != pages[page]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.flag_tables", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list the out-of-date pages (exit status 1)")
    args = parser.parse_args(argv)
    stale = stale_pages()
    for page, text in stale.items():
        if not args.check:
            write_text_atomic(page, text)
        print(f"{'out of date' if args.check else 'rewrote'}: {page.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
