"""The run directory's contract (schema) and its readers (analysis)."""
