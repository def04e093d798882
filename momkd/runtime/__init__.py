"""Lean batched inference over a folder of .h5 feature files; works without PyTorch."""
