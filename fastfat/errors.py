"""One exception type for bad user input: the CLI turns it into one stderr line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, model). The message is shown as is. A
    ValueError, so the Python API raises what callers expect for a bad argument."""
