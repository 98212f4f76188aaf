"""CPM's training-only pieces (paper §3.2): the prompting losses and their pure functions.

The class-agnostic model (``MODEL.CPM.ENABLED False``) never imports this package. The class
head that draws the prompts (CCDM, ``GMMClassPredictor``) lives with the other class predictors.
"""
from .batchnorm import frozen_norm_statistics
from .cpm_loss import CPMLoss
from .losses import acp_loss, acp_ratio_target, masked_average_pool, pcl_loss, sample_pixels, vcp_indices

__all__ = [
    "CPMLoss", "frozen_norm_statistics", "acp_loss", "acp_ratio_target", "masked_average_pool", "pcl_loss",
    "sample_pixels", "vcp_indices",
]
