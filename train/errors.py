"""Errors that mean "the user's input cannot run": run.py prints them as one line and exits 2."""


class UserInputError(Exception):
    pass
