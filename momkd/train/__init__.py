"""Training (PyTorch): datasets, sampling, the fit loop and cross-validated runs."""
