"""The errors txcompile raises for its users.

Every error names the thing the user gave (model, pass, option, input, file) and says what to do. The CLI turns a
`TxcError` into one line on stderr and exit status 2; anything else is a bug in txcompile and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "TxcError",
    "InputError",
    "SpecError",
    "CaptureError",
    "PassError",
    "VerificationError",
    "BackendError",
    "ArtifactError",
]


class TxcError(Exception):
    """Base class of every error txcompile raises because of what it was given."""


class InputError(TxcError, TypeError):
    """A model or example input of the wrong type or shape."""


class SpecError(TxcError, ValueError):
    """An unknown pass or backend, an unknown option, or an option value that does not parse or validate."""


class CaptureError(TxcError):
    """torch.export could not capture the model; the message names the failing op or source line and a hint."""


class PassError(TxcError):
    """A pass raised, or a pipeline did not reach a fixpoint; names the pass and the passes that ran before it."""


class VerificationError(TxcError):
    """A rewritten program disagrees with the original beyond what the pass's contract allows."""

    def __init__(self, message: str, *, pass_name: str, node: str | None = None, max_abs: float | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node
        self.max_abs = max_abs


class BackendError(TxcError):
    """A backend cannot lower a node and `strict=True` forbids falling back to ATen."""


class ArtifactError(TxcError):
    """An artifact directory cannot be written (OUT exists) or read (missing, corrupt, or from another format)."""
