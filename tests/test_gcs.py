"""gs:// storage and gs:// sources through gcsfs against a real GCS API emulator (no mocks)."""

from __future__ import annotations

import socket

import fsspec
import pytest

from conftest import tiny_configs
from coarse2fine.preprocess import schema, storage
from coarse2fine.preprocess.beam_jobs import preprocess_all

pytestmark = pytest.mark.slow
BUCKET = "c2f-test"


@pytest.fixture(scope="module")
def gcs():
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # without this gcsfs probes each bucket over gRPC and waits 60 s (DESIGN.md)
    mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    fsspec.filesystem("gs").clear_instance_cache()
    yield f"gs://{BUCKET}"
    mp.undo()
    server.stop()


def test_gs_round_trip(gcs, demo_folder):
    fs = fsspec.filesystem("gs")
    fs.put(str(demo_folder), f"{BUCKET}/inputs", recursive=True)
    cfgs = tiny_configs(f"{gcs}/inputs", f"{gcs}/store")
    ing, spec, dec = preprocess_all(*cfgs)
    assert ing.uris["images"].startswith(f"{gcs}/store/images/")
    n = len(list(demo_folder.rglob("*.png")))
    assert ing.counts["images"] + ing.counts["duplicates"] == n
    t = schema.read_table(ing.uris["images"])
    assert t.num_rows == ing.counts["images"]
    assert all(u.startswith(f"{gcs}/inputs/") for u in t.column("source_uri").to_pylist())
    assert schema.read_table(dec.uris["decomposition"]).num_rows == t.num_rows
    assert schema.read_table(spec.uris["spectral"]).num_rows == t.num_rows
    # the manifest is the commit marker: nothing temporary is left behind
    assert not [p for p in fs.find(f"{BUCKET}/store") if "_tmp-" in p]
    again = preprocess_all(*cfgs)
    assert all(r.reused for r in again)


def test_tokenizer_training_reads_and_checkpoints_on_gs(gcs, demo_folder):
    """Ray Train workers stream the gs:// images dataset and checkpoint to gs:// (through gcsfs)."""
    import ray

    from coarse2fine.preprocess.beam_jobs import ingest
    from coarse2fine.train.config import TokenizerConfig, TrainConfig
    from coarse2fine.train.launch import fit_tokenizer
    from coarse2fine.train.checkpoints import load_tokenizer

    data, pre, store = tiny_configs(str(demo_folder), f"{gcs}/train-store")
    images_uri = ingest(data, pre, store).uris["images"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)  # inherits the emulator env
    try:
        tok = TokenizerConfig(sit={"num_scales": 3, "tokens_per_scale": 4, "size": "tiny", "codebook_size": 64},
                              train=TrainConfig(max_steps=2, batch_size=4, checkpoint_every=2, adversarial_weight=0))
        res = fit_tokenizer(images_uri, tok, 32, f"{gcs}/train-store/checkpoints", "gs-run")
    finally:
        ray.shutdown()
    assert res.steps == 2 and res.checkpoint_uri.startswith(f"{gcs}/train-store/checkpoints/gs-run/")
    assert fsspec.filesystem("gs").exists(res.checkpoint_uri + "/state.pt")
    model = load_tokenizer(res.checkpoint_uri)
    assert model.cfg.num_scales == 3


def test_unusable_storage_roots_fail_first_in_one_line(gcs, tmp_path, monkeypatch):
    """A missing bucket, an unreachable store and a local root under a file each fail before any
    work with one line naming the root and the cause; a usable root leaves nothing behind."""
    from coarse2fine.preprocess.errors import UserError

    storage.check_writable(f"{gcs}/fine")
    assert not [p for p in fsspec.filesystem("gs").find(BUCKET) if ".c2f-probe" in p]
    with pytest.raises(UserError, match="storage.root gs://no-such-bucket/x cannot be used: bucket no-such-bucket does not exist"):
        storage.check_writable("gs://no-such-bucket/x")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a part of the path is a file"):
        storage.check_writable(str(tmp_path / "a-file" / "store"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed}")
    fsspec.filesystem("gs").clear_instance_cache()
    try:
        with pytest.raises(UserError, match=r"cannot be used: cannot reach the storage \(ConnectionRefusedError"):
            storage.check_writable(f"{gcs}/x")
    finally:
        fsspec.filesystem("gs").clear_instance_cache()
