"""corelab reports."""
