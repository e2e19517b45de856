"""Hyperparameter search: sweep specs, a results store, coverage-based ranking (CBS), published configs."""
