"""The experimental torch_xla path (``train.device: xla``): SIT trained through the project's own
``fit`` (Ray Train, MLflow, checkpoints) with the full objective (L2, MS-SSIM perceptual, the
adversarial loss from step 3, quantizer terms) on XLA:CPU, against the same run on eager CPU, and
resumed on XLA from a checkpoint after a stop.

Runs where torch_xla imports: ``make xla-env``, then ``.venv-xla/bin/pytest tests/test_xla.py``.
Skipped elsewhere, CI included (torch_xla pins its own torch, so it cannot share the main venv).
"""

from __future__ import annotations

import mlflow
import pytest
import torch

from conftest import tiny_configs, write_demo
from coarse2fine.evaluate.config import TrackingConfig
from coarse2fine.evaluate.tracking import MlflowLogger, configure
from coarse2fine.preprocess.beam_jobs import ingest
from coarse2fine.train.checkpoints import load_tokenizer
from coarse2fine.train.config import TokenizerConfig, TrainConfig
from coarse2fine.train.launch import fit_tokenizer

pytest.importorskip("torch_xla", reason="torch_xla is not installed (`make xla-env` makes its environment)")
pytestmark = pytest.mark.slow


def test_sit_trains_on_xla_cpu_as_on_eager_cpu(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # before Ray starts: its workers inherit it
    src = write_demo(tmp_path / "src", 12, resolution=32)
    data, pre, store = tiny_configs(str(src), str(tmp_path / "store"))
    images = ingest(data.model_copy(update={"validation_fraction": 0.0}), pre, store).uris["images"]
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="xla")
    configure(tracking)
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(tracking.experiment).experiment_id
    curves, fits = {}, {}
    try:  # eager CPU; XLA; XLA stopped after 3 steps, then resumed from its checkpoint
        for name, device, stops in (("eager", "auto", [None]), ("xla", "xla", [None]), ("resumed", "xla", [3, None])):
            run_id = client.create_run(experiment, run_name=name).info.run_id
            cfg = TokenizerConfig(
                sit={"num_scales": 3, "tokens_per_scale": 4, "size": "tiny", "codebook_size": 64},
                train=TrainConfig(max_steps=6, batch_size=4, lr=3e-3, checkpoint_every=3, log_every=1,
                                  sample_every=6, device=device, perceptual="ms_ssim"))  # XLA runs no TorchScript
            for stop in stops:
                fits[name] = fit_tokenizer(images, cfg, 32, str(tmp_path / "checkpoints"), name,
                                           logger=MlflowLogger(tracking, run_id), stop_after=stop)
            curves[name] = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    finally:
        ray.shutdown()
    assert fits["xla"].steps == fits["resumed"].steps == 6
    assert sorted(curves["xla"]) == sorted(curves["resumed"]) == list(range(6))
    for step in range(6):  # the same computation: XLA's fused kernels differ from eager only in rounding
        assert curves["xla"][step] == pytest.approx(curves["eager"][step], rel=1e-3), step
        assert curves["resumed"][step] == pytest.approx(curves["xla"][step], rel=1e-5), step
    model = load_tokenizer(fits["xla"].checkpoint_uri)  # an XLA run's checkpoint loads on CPU
    recon, idx, _ = model(torch.rand(1, 3, 32, 32))
    assert recon.shape == (1, 3, 32, 32) and idx.shape == (1, 3, 4)
