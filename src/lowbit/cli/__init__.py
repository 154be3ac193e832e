"""The `lowbit` command: a thin shell over the public functions."""
