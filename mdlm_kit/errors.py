"""The one exception type for mistakes a user can make and fix."""


class UserError(ValueError):
    """Bad input from a user (a path, a config value, a checkpoint): ``mdlm-kit`` prints its message as one line and
    exits with status 2, so the message should name the problem and the fix."""
