"""Repository tooling around the bundle: the study runner (``study.experiments``), its report (``study.report``),
the loss benchmark (``study.benchmark``) and the release packer (``study.release``).

None of it ships in the bundle archive. Run from the repository root with the bundle folder on the path, e.g.
``PYTHONPATH=bundle python -m study.experiments run docs/experiments/smoke.yaml`` (the Makefile targets do this).
"""
