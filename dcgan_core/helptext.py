"""One help style for every command: descriptions keep their line breaks, and every option with
a default says it (argparse's ArgumentDefaultsHelpFormatter also prints "default: None/False")."""

from __future__ import annotations

import argparse
import copy


def shows_default(action: argparse.Action) -> bool:
    """An option whose default is worth stating (not unset, not a flag's False; 0 is a value)."""
    return bool(action.option_strings) and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
        and action.default != []


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and shows_default(action):  # argparse prints nothing for an option without help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def subcommand(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
