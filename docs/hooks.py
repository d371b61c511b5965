"""MkDocs hook: the command-line reference is generated from the argparse parsers, so it cannot drift from them."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ.setdefault("COLUMNS", "110")  # argparse wraps at the terminal width: fixed, for a stable page
    return parser.format_help().rstrip()


def cli_reference() -> str:
    from memory_peft.cli import PROG, build_parser
    from memory_peft.train_args import build_parser as training_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parts = [f"## `{PROG}`\n\n```text\n{_help(parser)}\n```"]
    for name, sub in commands.choices.items():
        sub = training_parser(f"{PROG} train") if name == "train" else sub
        parts.append(f"## `{PROG} {name}`\n\n```text\n{_help(sub)}\n```")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown
