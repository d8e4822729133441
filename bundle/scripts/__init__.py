"""Global + local contrastive pre-training for slice-wise segmentation (Chaitanya et al., NeurIPS 2020).

MONAI imports this package as ``scripts`` from the bundle folder; the configs reference its modules lazily
(``_target_: scripts.<module>.<name>``), so the bundle runs from any working directory. Importing it installs the
one-line error report of ``scripts.errors`` (``BUNDLE_DEBUG=1`` shows tracebacks).
"""

from scripts.errors import install_excepthook

install_excepthook()
