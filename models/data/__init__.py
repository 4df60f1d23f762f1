"""Data the networks learn from and are measured on: synthetic intra-oral video and the on-disk format."""
