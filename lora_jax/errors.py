"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
    """A bad input from the user (path, task, config key, data).

    `train.py` prints ``error: <message>`` on one line and exits with status 2; nothing is written
    to the workdir before inputs are validated.
    """
