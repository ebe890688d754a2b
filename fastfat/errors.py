"""One exception type for bad user input: the CLI turns it into one stderr line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message is shown as is."""
