"""CPM's training-only pieces (paper §3.2): the prompt pass, the prompting losses and their pure functions.

The class-agnostic model (``MODEL.CPM.ENABLED False``) never imports this package. The class
head that draws the prompts (CCDM, ``GMMClassPredictor``) lives with the other class predictors.
"""
from .batchnorm import split_batch_norm
from .cpm_loss import CPMLoss
from .losses import (acp_loss, acp_ratio_target, masked_average_pool, pcl_loss, sample_pixel_slots, sample_pixels,
                     vcp_indices)
from .prompt_pass import PromptBatch, PromptPass

__all__ = [
    "CPMLoss", "PromptPass", "PromptBatch", "split_batch_norm", "acp_loss", "acp_ratio_target",
    "masked_average_pool", "pcl_loss", "sample_pixels", "sample_pixel_slots", "vcp_indices",
]
