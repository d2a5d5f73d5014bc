"""The shared errors' former home, kept so that `from pipelines.errors import UserInputError` still
works; they live in common/errors.py (below every package)."""
from common.errors import DataError, UserInputError

__all__ = ["DataError", "UserInputError"]
