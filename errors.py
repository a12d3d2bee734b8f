"""The one error type for a user's mistake, and the one way every script reports it and exits."""
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
