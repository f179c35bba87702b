"""Evaluations: each returns a list of record dicts that ``longreach.evals.report`` renders."""

from .efficiency import efficiency
from .needle import needle
from .passkey import passkey
from .perplexity import perplexity

__all__ = ["efficiency", "needle", "passkey", "perplexity"]
