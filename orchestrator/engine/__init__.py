"""The trial, once: its phases in order (trial.py), written against hosts.base.Host."""
