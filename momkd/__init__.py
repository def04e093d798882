"""momkd: Momentum Memory Knowledge Distillation for genomic biomarker prediction from histology.

Four stages, four packages:

* ``momkd``          the training library (data, graph, model, losses, training, evaluation)
* ``momkd.export``   freezes a trained run into a deployable model folder (ONNX, TensorRT)
* ``momkd.runtime``  lean batched inference over a folder of ``.h5`` feature files (no PyTorch)
* ``momkd.cli``      the ``momkd`` command

Importing this package never imports PyTorch.
"""

__version__ = "0.1.0"
