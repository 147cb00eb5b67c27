"""Crucible: from "should we train?" to a released, evaluated model."""

__version__ = "0.1.0"
