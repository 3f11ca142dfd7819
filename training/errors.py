"""Errors raised by ``training``."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Base class of every error raised by training; maps to HTTP 500/422 at an edge."""

    http_status = 422


class RegistryError(TrainingError):
    """A model, version or alias that is not in the MLflow Model Registry."""

    http_status = 404


class RegistryUnreachable(TrainingError):
    """The tracking server did not answer (down, or a network fault): nothing is known of
    the model, so nothing may be reported as missing."""

    http_status = 503


class PackageError(TrainingError):
    """Input that does not fit the model package's documented schema."""
