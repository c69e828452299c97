"""corelab expectations."""
