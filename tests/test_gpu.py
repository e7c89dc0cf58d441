"""The CUDA paths (marker ``gpu``: skipped without a GPU, run on a lent GPU machine): bf16 autocast
through a tokenizer's training loss, and Ray Train with the NCCL backend through the project's own
``fit``."""

from __future__ import annotations

import pytest
import torch

from coarse2fine.train import methods

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_autocast_loss_is_close_to_fp32_and_has_gradients():
    from coarse2fine.train.steps import tokenizer_eval_step

    method = methods.tokenizer("sit")
    torch.manual_seed(0)
    model = method.build(method.model_config(method.params(num_scales=3, tokens_per_scale=4, size="tiny",
                                                           codebook_size=64), 32)).cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    fp32, _ = tokenizer_eval_step(model, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        recon, _, losses = model(x)
        loss = torch.nn.functional.mse_loss(recon.float(), x) + losses["aux"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert (recon.float() - fp32).abs().mean() < 0.05  # bf16 keeps ~3 significant digits


def test_fit_with_the_nccl_backend(tmp_path, demo_folder):
    import ray

    from coarse2fine.preprocess.beam_jobs import ingest
    from coarse2fine.train.checkpoints import load_tokenizer
    from coarse2fine.train.config import TokenizerConfig, TrainConfig
    from coarse2fine.train.launch import fit_tokenizer
    from conftest import tiny_configs

    data, pre, store = tiny_configs(str(demo_folder), str(tmp_path / "store"))
    images = ingest(data, pre, store).uris["images"]
    cfg = TokenizerConfig(sit={"num_scales": 3, "tokens_per_scale": 4, "size": "tiny", "codebook_size": 64},
                          train=TrainConfig(max_steps=2, batch_size=4, checkpoint_every=2, use_gpu=True))
    try:
        fit = fit_tokenizer(images, cfg, 32, str(tmp_path / "checkpoints"), "nccl")
    finally:
        ray.shutdown()
    assert fit.steps == 2 and load_tokenizer(fit.checkpoint_uri) is not None


@pytest.mark.parametrize("prefix", [0, 5])
def test_cuda_graph_sampling_gives_the_tokens_of_eager_cached_sampling(prefix):
    """The captured decode step replays the same kernels as the eager one: identical tokens, with and
    without a prefix (the capture's writes at position 1 are overwritten before they are read)."""
    from coarse2fine.train.models.arsit import ARSITConfig, build_generator
    from coarse2fine.train.sampling import sample_tokens

    torch.manual_seed(0)
    gen = build_generator(ARSITConfig(3, 8, 64, num_classes=4, size="tiny")).cuda()
    cond = torch.tensor([0, 1, 2, 4], device="cuda")
    pre = torch.randint(0, 64, (4, prefix), device="cuda")
    runs = [sample_tokens(gen, cond, 24, pre, guidance=2.0, top_k=10, cuda_graph=graph,
                          generator=torch.Generator("cuda").manual_seed(1)) for graph in (False, True)]
    assert torch.equal(*runs) and torch.equal(runs[1][:, :prefix], pre)
