"""User-facing errors: one line that names the problem and the fix."""


class HRKDError(Exception):
    """An error caused by input (params, data, paths), not by a bug.

    Stage entry points turn it into a one-line message and exit code 2, so users never
    see a traceback from deep inside torch or pandas for a typo in params.yaml.
    """
