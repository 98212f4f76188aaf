from .predictor import AVSPredictor
from .trainer import OutputDirNotEmpty, Trainer, build_optimizer, check_output_dir

__all__ = ["Trainer", "build_optimizer", "check_output_dir", "OutputDirNotEmpty", "AVSPredictor"]
