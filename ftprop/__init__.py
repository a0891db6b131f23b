"""ftprop: Forward Target Propagation and its peers, training neural networks without backpropagation."""
from .data import Dataset, DatasetError, load_dataset
from .models import Block, Net, build_model, mlp
from .rules import RULES, Rule, StepOutput, make_rule
from .train import TrainConfig, TrainingDiverged, train

__version__ = "0.1.0"
__all__ = ["Block", "Dataset", "DatasetError", "Net", "RULES", "Rule", "StepOutput", "TrainConfig",
           "TrainingDiverged", "build_model", "load_dataset", "make_rule", "mlp", "train"]
