"""The one exception type every strata package raises for bad input.

Commands print it as a single line and exit non-zero; the plugin server turns
it into `{"Err": ...}`. Anything else escaping is a bug, not user error.
"""


class StrataError(Exception):
    """A failure the user can act on; str() is the one-line message."""
