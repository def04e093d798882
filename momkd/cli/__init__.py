"""The ``momkd`` command line."""
