"""mlip_core: the library behind the MLIP book.

MLIP (Li et al., CVPR 2024, arXiv 2402.02045) — medical vision-language pretraining with a
divergence encoder and knowledge-guided contrastive learning — reimplemented for chest
X-rays and radiology reports. Notebooks in ``notebooks/`` import this package and tell the story;
``book/method.md`` ("The method as implemented") maps each part of the method to its module.
"""

__version__ = "0.1.0"
