"""The one exception type whose message is shown to users as a single line (CLI exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unsupported model, an out-of-range option.

    The CLI prints `sdrt: error: <message>` and exits with code 2, never a traceback.
    """
