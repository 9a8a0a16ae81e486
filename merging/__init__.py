"""Model merging as tree-map operations over pytrees."""
