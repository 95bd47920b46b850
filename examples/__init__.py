"""Reproductions of the lore_jax compressed-gradients spec's experiments E1-E8 (section 6.2)."""
