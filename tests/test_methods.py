"""The method registry: typed sections from the model dataclasses, token layouts, capabilities,
checkpoints that record their method, and config dispatch (``--set tokenizer.method=…``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from coarse2fine.pipelines.config import ConfigError, load_config
from coarse2fine.preprocess import schema
from coarse2fine.preprocess.schema import TokenColumn
from coarse2fine.train import checkpoints, methods
from coarse2fine.train.methods.base import UnsupportedError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/tiny.yaml"
ALL = [*methods.TOKENIZERS.values(), *methods.GENERATORS.values()]


def tiny_tokenizer(name: str, **params):
    cfg = load_config(TINY, [f"tokenizer.method={name}"] + [f"tokenizer.{name}.{k}={v}" for k, v in params.items()])
    method = methods.tokenizer(name)
    torch.manual_seed(0)
    return method, method.build(cfg.tokenizer.model_config_for(cfg.data.resolution)).eval()


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_section_defaults_are_the_model_dataclass_defaults(method):
    fields = {f.name: f.default for f in dataclasses.fields(method.config_cls)}
    section = method.params()
    assert section.model_dump().keys() <= fields.keys()
    for k, v in section.model_dump().items():
        assert v == fields[k], k


@pytest.mark.parametrize("name", list(methods.TOKENIZERS))
def test_encode_writes_the_declared_layout(name):
    """What a tokenizer's encode returns fits its declared layout and the Arrow tokens schema, and
    equals the model's own indices (brute force through the model's forward)."""
    method, model = tiny_tokenizer(name)
    layout = method.layout(model.cfg)
    x = torch.rand(3, 3, 32, 32)
    k = method.factors(model.cfg)  # Mumford–Shah bases the model takes beside the image (CART)
    bases = (torch.rand(3, k, 3, 32, 32),) if k else ()
    cols = method.encode(model, x, *bases)
    assert list(cols) == [c.name for c in layout]
    with torch.no_grad():
        _, idx, _ = model(x, *bases)
    if layout[0].dtype == "float16":  # continuous: the model's latents (the posterior mean) come first
        np.testing.assert_allclose(cols[layout[0].name].reshape(3, -1), idx.reshape(3, -1).numpy(), atol=2e-3, rtol=2e-3)
    else:
        flat = np.concatenate([cols[c.name].reshape(3, -1) for c in layout], axis=1)
        np.testing.assert_array_equal(flat, idx.reshape(3, -1).numpy())
    for c in layout:
        assert cols[c.name].shape == (3, *c.shape) and cols[c.name].dtype == np.dtype(c.dtype)
        if c.vocab:
            assert 0 <= cols[c.name].min() and cols[c.name].max() < c.vocab
    rows = [{"key": str(i), "label": None, "split": "train", **{k: v[i] for k, v in cols.items()}} for i in range(3)]
    table = schema.table_from_rows(rows, schema.tokens_schema(layout))
    assert table.num_rows == 3 and table.schema.field(layout[0].name).type.shape == list(layout[0].shape)
    # the tokens manifest documents every column (ids, latents) of every method's layout
    docs = schema.column_docs(table.schema)
    assert list(docs) == table.schema.names
    assert all(("token ids" in docs[c.name]) == bool(c.vocab) for c in layout)


def test_layout_round_trips_through_the_manifest_json():
    layout = [TokenColumn("ids_0", (2, 2), "int32", 64, "scale"), TokenColumn("latent", (4, 8, 8), "float16", 0, "latent")]
    manifest = {"config": {"layout": schema.layout_to_json(layout)}}
    assert schema.layout_from_manifest(manifest, "u") == layout
    assert schema.tokens_schema(layout).field("latent").type.value_type == pa.float16()
    with pytest.raises(schema.IncompleteDatasetError, match="without a layout"):
        schema.layout_from_manifest({"config": {"tokenizer_run": "r"}}, "tokens/v1")
    with pytest.raises(AssertionError):
        TokenColumn("x", (2,), "int32", 0, "scale")  # ids need a vocabulary


def test_ar_sit_sizes_itself_from_the_layout_and_refuses_others():
    ar = methods.generator("ar_sit")
    layout = [TokenColumn(f"ids_{s}", (3, 3), "int32", 50, "scale") for s in range(4)]
    cfg = ar.model_config(ar.params(size="tiny"), layout, num_classes=5)
    assert (cfg.num_scales, cfg.tokens_per_scale, cfg.codebook_size, cfg.num_classes) == (4, 9, 50, 5)
    with pytest.raises(UnsupportedError, match="models int32 scale tokens"):
        ar.accept([TokenColumn("latent", (4, 8, 8), "float16", 0, "latent")])
    with pytest.raises(UnsupportedError, match="equal tokens"):
        ar.accept([TokenColumn("ids_0", (1, 1), "int32", 8, "scale"), TokenColumn("ids_1", (2, 2), "int32", 8, "scale")])


@pytest.mark.parametrize("enc, dec, supported", [
    (True, True, ["edit", "refine", "stop_scale", "upsample"]),
    (True, False, ["upsample"]),  # SIT-SCE: upsampling (seed §5.4); edit also decodes the kept scales
    (False, True, ["refine", "stop_scale"]),  # SIT-SCD: generation with early stop (seed §5.3)
    (False, False, []),
])
def test_capabilities_follow_the_scale_causal_switches(enc, dec, supported):
    sit, ar = methods.tokenizer("sit"), methods.generator("ar_sit")
    cfg = sit.model_config(sit.params(num_scales=3, tokens_per_scale=4), 32)
    cfg = dataclasses.replace(cfg, causal_encoder=enc, causal_decoder=dec)
    assert ar.supported(sit, cfg) == supported
    for cap in {"edit", "refine", "stop_scale", "upsample"} - set(supported):
        with pytest.raises(UnsupportedError, match=f"generator method ar_sit over tokenizer method sit \\({sit.describe(cfg)}\\)"):
            ar.require(cap, sit, cfg)


@pytest.mark.parametrize("name", list(methods.TOKENIZERS))
def test_checkpoint_records_the_method_and_reloads_the_same_model(name, tmp_path):
    method, model = tiny_tokenizer(name)
    checkpoints.save_state(str(tmp_path), "tokenizer", name, model.cfg, {"model": model}, step=7)
    loaded_method, loaded = checkpoints.load_model(str(tmp_path), "cpu")
    assert loaded_method is method and loaded.cfg == model.cfg
    k = method.factors(model.cfg)
    x = (torch.rand(2, 3, 32, 32),) + ((torch.rand(2, k, 3, 32, 32),) if k else ())
    torch.testing.assert_close(loaded(*x)[0], model(*x)[0])
    with pytest.raises(ValueError, match="holds a tokenizer, not a generator"):
        checkpoints.load_generator(str(tmp_path))


def test_checkpoint_without_a_method_is_a_clear_error(tmp_path):
    torch.save({"model": {}, "model_config": {}}, tmp_path / checkpoints.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="before checkpoints recorded their method"):
        checkpoints.load_model(str(tmp_path))


def test_any_method_is_selected_on_any_config_file_and_only_its_section_is_fingerprinted():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for name in methods.TOKENIZERS:
            cfg = load_config(path, [f"tokenizer.method={name}"])
            assert cfg.tokenizer.spec()["method"] == name
    base = load_config(TINY).tokenizer.spec()
    assert load_config(TINY, ["tokenizer.vit_vq.codebook_size=32"]).tokenizer.spec() == base  # inactive section
    assert load_config(TINY, ["tokenizer.sit.codebook_size=32"]).tokenizer.spec() != base
    assert load_config(TINY, ["tokenizer.train.log_every=5"]).tokenizer.spec() == base  # how it runs, not what


@pytest.mark.parametrize("override, message", [
    ("tokenizer.method=nope", "unknown tokenizer method 'nope'; registered: sit, vit_vq, cq, vqgan"),
    ("generator.method=nope", "unknown generator method 'nope'; registered: ar_sit, maskgit"),
    ("tokenizer.num_scales=2", "tokenizer.num_scales: unknown key; method parameters live in tokenizer.sit.num_scales"),
    ("train.max_steps=2", "train: unknown key; tokenizer training settings live in tokenizer.train"),
    ("tokenizer.sit.tokens_per_scale=5", "square"),
    ("tokenizer.sit.codebook_size=1", "codebook_size must be >= 2"),
    ("generator.ar_sit.size=huge", "unknown generator size 'huge'"),  # at load, not after tokenizer training
    ("generator.ar_sit.cond_drop_prob=1.5", "cond_drop_prob"),
])
def test_config_errors_name_the_registry(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [override])


@pytest.mark.parametrize("sizes", [[1, 4, 16], [4, 4, 4], [3, 1, 5, 2], [1, 4, 9, 16, 16]])  # the last: CART's maps
def test_block_causal_mask_for_blocks_of_unequal_sizes(sizes):
    """Against a brute-force loop: token i may see token j iff j's block is not after i's."""
    from coarse2fine.train.kernels.attention import block_causal_mask

    owner = [b for b, n in enumerate(sizes) for _ in range(n)]
    expected = torch.tensor([[owner[j] <= owner[i] for j in range(len(owner))] for i in range(len(owner))])
    assert torch.equal(block_causal_mask(sizes), expected)


@pytest.mark.parametrize("side, ok", [(32, True), (16, True), (8, True), (4, False), (24, False), (64, False)])
def test_sit_accepts_inputs_of_its_resolution_over_powers_of_two(side, ok):
    sit = methods.tokenizer("sit")
    cfg = sit.model_config(sit.params(num_scales=3, tokens_per_scale=4), 32)  # scales at 8, 16, 32 px
    if ok:
        sit.check_input_side(cfg, side)
    else:
        with pytest.raises(UnsupportedError, match=f"{side}px image"):
            sit.check_input_side(cfg, side)


@pytest.mark.parametrize("pair, steps", [("sit:ar_sit", None), ("cq:maskgit", None), ("cq:maskgit", 3),
                                         ("cart:cart", None), ("kl:mar", 5), ("kl:far", None)])
def test_reported_forward_passes_are_the_passes_sampling_runs(pair, steps):
    """What evaluation reports per image (``passes``) against forward calls counted with hooks
    during one guided sampling call: the first attention block once per transformer pass, the
    diffusion MLP once per diffusion pass."""
    from coarse2fine.train.methods.base import SampleSettings

    tok_name, gen_name = pair.split(":")
    tok_m, tok = tiny_tokenizer(tok_name)
    gen_m = methods.generator(gen_name)
    layout = [dataclasses.replace(c, scale=1.0) for c in tok_m.layout(tok.cfg)]
    params = {"diffusion_steps": 3} if gen_name in ("mar", "far") else {}
    gen = gen_m.build(gen_m.model_config(gen_m.params(size="tiny", **params), layout, 3)).eval()
    settings = SampleSettings(guidance=2.0, steps=steps)
    counts = {"forward_passes": 0, "diffusion_passes": 0}

    def counter(key):
        def hook(*_):
            counts[key] += 1
        return hook

    first_block = gen.encoder[0] if gen_name in ("mar", "far") else gen.blocks[0]
    first_block.register_forward_hook(counter("forward_passes"))
    if gen_name in ("mar", "far"):
        gen.head.net.register_forward_hook(counter("diffusion_passes"))
    gen_m.sample(gen, tok, torch.tensor([0, 2]), settings, seed=0)
    assert counts == gen_m.passes(gen.cfg, settings) and counts["forward_passes"] > 1
