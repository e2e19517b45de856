"""SpIEL: sparse delta layer, selection (prune/regrow), optimizers (AdamW with age, SM3)."""

from tunelab.methods.spiel.method import SpielMethod

__all__ = ["SpielMethod"]
