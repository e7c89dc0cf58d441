"""coarse2fine: coarse-to-fine image tokenizers and generators (SIT, CQ, CART, FAR).

One import root; the repository folders ``pipelines/``, ``preprocess/``, ``train/`` and
``evaluate/`` are mapped under it by ``setup.py``.
"""

__version__ = "0.1.0"
