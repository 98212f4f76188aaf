"""cpm_d2's loggers set up the way detectron2 sets up its own (``default_setup``).

``setup_cpm_logger(output_dir, rank)``: the ``cpm_d2`` logger and its children (dataset loading
summaries, the OUTPUT_DIR lock, the evaluator's tables, resume's warnings, checkpoint load tables)
print to the console on rank 0, formatted as detectron2's lines, and go to ``output_dir/log.txt``
on rank 0 and ``output_dir/log.txt.rank<N>`` on the other ranks: the files detectron2's logger
writes. With ``detectron2=True`` detectron2's and fvcore's loggers are set up the same way (for
tools that do not call ``default_setup``). Calling it again with the same arguments adds nothing.
"""
import logging

__all__ = ["setup_cpm_logger"]


def setup_cpm_logger(output_dir=None, rank=None, *, detectron2=False):
    """Console (rank 0) and log files (``output_dir``: None = console only) for cpm_d2's loggers.

    ``rank``: this process's global rank (default: ``detectron2.utils.comm.get_rank()``). Returns the
    ``cpm_d2`` logger.
    """
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    rank = comm.get_rank() if rank is None else int(rank)
    for name, abbrev in (("cpm_d2", "cpm_d2"),) + ((("detectron2", "d2"), ("fvcore", "fvcore")) if detectron2 else ()):
        setup_logger(output_dir, distributed_rank=rank, name=name, abbrev_name=abbrev)
    return logging.getLogger("cpm_d2")
