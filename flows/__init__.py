"""corelab flows."""
