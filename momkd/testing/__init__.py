"""Test and benchmark helpers shipped with the package (the PyG pattern): a toy model folder with the exported
graph's exact contract, and TRIDENT-layout slide folders. Nothing in the training library, export or runtime
imports this package."""
