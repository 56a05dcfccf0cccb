"""pyterrier-ce: train and run transformer cross-encoder rerankers in PyTerrier."""

__version__ = "0.1.0"

from . import objectives  # noqa: E402
from .candidates import Candidates  # noqa: E402
from .data import BeirDataset  # noqa: E402
from .history import TrainingLog, plot_training_log  # noqa: E402
from .irds import IrdsDataset, open_dataset  # noqa: E402
from .model import CrossEncoder  # noqa: E402
from .settings import TrainingSettings  # noqa: E402

__all__ = ["CrossEncoder", "BeirDataset", "IrdsDataset", "open_dataset", "Candidates", "TrainingSettings",
           "TrainingLog", "plot_training_log", "objectives", "__version__"]
