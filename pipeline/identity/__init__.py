"""Identity stitching: namespaces, normalisers, datasets config and a reference stitching model."""
