"""The stitching stages' shared vocabulary: typed stage messages (`messages`) and in-process delivery (`delivery`)."""
