"""pyterrier-ce: train and run transformer cross-encoder rerankers in PyTerrier."""

__version__ = "0.1.0"

from .data import BeirDataset  # noqa: E402
from .model import CrossEncoder  # noqa: E402

__all__ = ["CrossEncoder", "BeirDataset", "__version__"]
