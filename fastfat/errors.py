"""One exception type for bad user input: the CLI turns it into one stderr line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message is shown as is."""


class DiskFull(UserError):
    """A write found no room (ENOSPC, a quota): not the input's fault, so a sweep stops at the
    first instead of failing every point after it (fastfat.files.disk_full_error)."""
