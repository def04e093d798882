"""``momkd report``: a run folder -> a self-contained report (Markdown/HTML and PNG figures).

Modules, one concern each: ``runfolder`` (read the run, torch-free), ``tables`` (CV and comparison tables from
summary.json, torch-free), ``figures`` (ROC, loss, memory dynamics; matplotlib), ``memory_codes`` (top test
patches per memory code; PyTorch), ``crops`` (patch images; openslide), ``document`` (Markdown/HTML
rendering) and ``build`` (the report's sections).
"""
