"""One exception type for bad user input: the CLI turns it into one stderr line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, model). The message is shown as is. A
    ValueError, so the Python API raises what callers expect for a bad argument."""


class DiskFull(UserError):
    """A write found no room (ENOSPC, a quota): not the input's fault, so a sweep stops at the
    first instead of failing every point after it (fastfat.files.disk_full_error)."""
