"""corelab accreditation."""
