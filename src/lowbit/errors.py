"""Errors lowbit raises for user mistakes: the CLI prints them as one line, without a traceback."""


class LowbitError(Exception):
    """A problem with the user's input (model, data, recipe, paths); the message names the fix."""
