"""Certified accuracy for the worker: the one definition is torch-free, in
:mod:`smoothcert.service.core.accuracy`, where the API's curve finds it too; this module names it
for the worker's callers."""

from __future__ import annotations

from smoothcert.service.core.accuracy import (
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_steps,
)

__all__ = ["average_certified_radius", "certified_accuracy", "certified_accuracy_steps"]
