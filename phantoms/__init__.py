"""corelab phantoms."""
