"""The one error a user can fix, and the one way a command ends on it."""
import functools
import sys


class DataError(Exception):
    """Bad input data or an unusable path; the message names the file and what is wrong."""


def command(main):
    """Wrap a command's main(argv) -> exit code: a DataError ends it as one `error: message` line on stderr and exit
    code 2, with nothing else printed (--debug among the arguments shows the traceback instead)."""

    @functools.wraps(main)
    def run(argv=None):
        arguments = sys.argv[1:] if argv is None else list(argv)
        try:
            return main(arguments)
        except DataError as error:
            if "--debug" in arguments:
                raise
            print(f"error: {error}", file=sys.stderr)
            return 2

    return run
