"""The config schema (defaults) and its validation: one-line errors before any compile."""
