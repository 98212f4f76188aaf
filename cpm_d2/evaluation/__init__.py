"""Evaluation of audio-visual segmentation: both AVS protocols, matching stability, coverage."""
from .avs_evaluator import AVSEvaluator, build_avs_evaluator, parse_subsets
from .coverage import coverage_score, frame_coverage
from .metrics import avsbench_binary, avsbench_semantic, dataset_protocol
from .stability import STSHook, matching_stability_score

__all__ = [
    "AVSEvaluator",
    "build_avs_evaluator",
    "parse_subsets",
    "coverage_score",
    "frame_coverage",
    "dataset_protocol",
    "avsbench_semantic",
    "avsbench_binary",
    "STSHook",
    "matching_stability_score",
]
