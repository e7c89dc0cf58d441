"""The method registry: every tokenizer and generator the pipeline can train, by config name.

Adding a method = its files (model, ``train/methods/<name>.py``, tests) + one line below; the
config grows a ``tokenizer.<name>`` / ``generator.<name>`` section from its declaration. See the
README, "Adding a method".
"""

from __future__ import annotations

from coarse2fine.train.methods.ar_sit import ARSIT
from coarse2fine.train.methods.base import GeneratorMethod, TokenizerMethod, UnsupportedError
from coarse2fine.train.methods.cart import CART
from coarse2fine.train.methods.cart_ar import CARTAR
from coarse2fine.train.methods.cq import CQ
from coarse2fine.train.methods.far import FAR
from coarse2fine.train.methods.kl import KL
from coarse2fine.train.methods.mar import MAR
from coarse2fine.train.methods.maskgit import MaskGIT
from coarse2fine.train.methods.sit import SIT
from coarse2fine.train.methods.vit_vq import ViTVQ
from coarse2fine.train.methods.vqgan import VQGAN

TOKENIZERS: dict[str, TokenizerMethod] = {m.name: m for m in (SIT(), ViTVQ(), CQ(), VQGAN(), CART(), KL())}
GENERATORS: dict[str, GeneratorMethod] = {m.name: m for m in (ARSIT(), MaskGIT(), CARTAR(), MAR(), FAR())}


def get(kind: str, name: str) -> TokenizerMethod | GeneratorMethod:
    """The registered ``kind`` (tokenizer / generator) method ``name``; UnsupportedError otherwise."""
    registry = TOKENIZERS if kind == "tokenizer" else GENERATORS
    if name not in registry:
        raise UnsupportedError(f"unknown {kind} method {name!r}; registered: {', '.join(registry)}")
    return registry[name]


def tokenizer(name: str) -> TokenizerMethod:
    return get("tokenizer", name)


def generator(name: str) -> GeneratorMethod:
    return get("generator", name)
