"""Training support: datasets (embedded and real on-disk formats) and the model zoo."""
