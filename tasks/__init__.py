"""corelab tasks."""
