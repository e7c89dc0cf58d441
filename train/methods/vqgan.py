"""The spatial-VQ baseline of CQ's Table 6a (``tokenizer.method: vqgan``): the same conv autoencoder
and Euclidean VQ as CQ, quantizing the H1·W1 spatial vectors of dimension C instead of the C
channels (``code_dim`` 8 = the paper's low-dimensional LlamaGen row). Tokens: one int32 H1×W1 map
``ids`` (role ``scale``, raster order), so AR-SIT over it is a LlamaGen-style spatial AR baseline."""

from __future__ import annotations

from coarse2fine.train.methods.base import params_section
from coarse2fine.train.methods.cq import CONV_CODE, CQ
from coarse2fine.train.models.conv_vq import ConvVQConfig


class VQGAN(CQ):
    name = "vqgan"
    summary = "spatial VQ baseline on CQ's conv autoencoder (CQ seed Table 6a)"
    axis = "spatial"
    params = params_section(ConvVQConfig, ("resolution", "axis"),
                            "Spatial VQ parameters (see train/models/conv_vq.py); code_dim: null = z_channels.")
    code = ("train.methods.cq", "train.methods.vqgan") + CONV_CODE
