"""Training, along the data flow: a plan resolved from the settings (:mod:`.plan`), the groups of
each step and their tokenised pairs (:mod:`.batches`), the forward and backward passes whatever
memory allows (:mod:`.steps`), the optimiser and the model's training mode (:mod:`.optimiser`),
validation and the best weights (:mod:`.validation`), checkpoints (:mod:`.checkpoints`), and the
loop that runs them in order (:mod:`.loop`). It is given a model, a tokenizer, a device and a
plan, and gives the trained model back; it knows nothing of :class:`~pyterrier_ce.CrossEncoder`.
"""
from .checkpoints import CheckpointError
from .loop import train
from .plan import TrainingPlan, plan_training
from .sharding import holds_shards
from .steps import NonFiniteLoss
from .validation import Validator

__all__ = ["train", "TrainingPlan", "plan_training", "Validator", "NonFiniteLoss", "CheckpointError",
           "holds_shards"]
