"""SpIEL: sparse delta layer, selection (prune/regrow), optimizers (AdamW with age, SM3), config."""
