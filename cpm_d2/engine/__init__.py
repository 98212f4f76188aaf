from .logger import setup_cpm_logger
from .output_lock import OutputDirLocked, output_dir_lock
from .predictor import AVSPredictor
from .trainer import OutputDirNotEmpty, Trainer, build_optimizer, check_output_dir

__all__ = ["Trainer", "build_optimizer", "check_output_dir", "OutputDirNotEmpty", "AVSPredictor", "output_dir_lock",
           "OutputDirLocked", "setup_cpm_logger"]
