"""``momkd serve``: one model folder on NVIDIA Triton Inference Server (the ``tritonserver`` bundled with the
``nvidia-pytriton`` wheel, Python backend; extra ``momkd[serve]``).

Modules: ``service`` (check, graph, pack and run requests on the runtime backend, Triton-free), ``triton_model``
(the Python-backend model around it), ``repository`` (config.pbtxt text, the served repository), ``server``
(find the bundled server, its environment, start/ready/stop). The client side is ``momkd.runtime.remote``; the
repository for stock Triton containers is ``momkd.export.triton_repo``.
"""
