"""Errors that name the thing that went wrong and the fix."""
from __future__ import annotations

__all__ = ["RewriteError", "CaptureError", "NoAttentionError", "SpecError", "PassError",
           "VerificationError", "BackendError", "EvaluationError"]


class RewriteError(Exception):
    """Base class of every error raised by rewrite."""


class CaptureError(RewriteError):
    """The model could not be traced into a graph."""


class NoAttentionError(RewriteError):
    """The model holds no attention that could be recognized."""


class SpecError(RewriteError, ValueError):
    """A pipeline spec names an unknown pass or option, or gives a bad value."""


class PassError(RewriteError):
    """A pass failed; the message names the pass and the passes already run."""


class VerificationError(RewriteError):
    """An exact stage differs from the original beyond round-off."""


class BackendError(RewriteError):
    """A backend cannot run a site; the message names the site and the feature."""


class EvaluationError(RewriteError):
    """A model or text cannot be evaluated (no causal LM head, no tokenizer, empty text)."""
