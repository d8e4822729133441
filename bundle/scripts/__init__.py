"""Global + local contrastive pre-training for slice-wise segmentation (Chaitanya et al., NeurIPS 2020).

MONAI imports this package as ``scripts`` from the bundle folder; the configs reference its modules lazily
(``_target_: scripts.<module>.<name>``), so the bundle runs from any working directory.
"""
