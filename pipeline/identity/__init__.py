"""Identity stitching: namespaces, normalisers, datasets config, the identity stage (its reference model, a
test oracle, is tests/identity/reference.py)."""
