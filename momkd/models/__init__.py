"""Models (PyTorch): the graph encoder, class memory, memory-guided attention head, MoMKD and ABMIL."""
