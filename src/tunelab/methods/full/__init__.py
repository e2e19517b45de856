"""Full fine-tuning: every weight trains (config.py, method.py)."""
