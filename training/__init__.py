"""Training code for the embedded demo model (see training/README.md)."""
