"""The one command-line shape every script shares: the error type for a user's mistake, the one way to report it
and exit, and the help formatter that shows each flag's default."""
import argparse
import copy
import sys


class UsageError(ValueError):
    """A problem with the user's arguments or files: scripts print it in one line, without a traceback."""


def exit_on_usage_error(prog, run, *args, **kwargs):
    """Call run(*args, **kwargs); on a UsageError print `prog: error: message` and exit with status 2."""
    try:
        return run(*args, **kwargs)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


def check_at_least(minimum, **flags):
    """UsageError naming the first flag (`name=value`; None: not given) whose value is below `minimum`."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name} must be at least {minimum}, got {value}.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: the description as written, and after each flag its default ("(default: X)"), also
    for a flag without help text; a required flag has none, and a help text that states its default keeps its own."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.required or "default" in help_text.lower():
            return help_text
        return super()._get_help_string(action)

    def _format_action(self, action):
        if (not action.help and action.option_strings and not action.required
                and action.default is not argparse.SUPPRESS):
            action = copy.copy(action)  # argparse prints no help line for a flag without help text: give it one
            action.help = "(default: %(default)s)"
        return super()._format_action(action)
