"""Real Beam runs (local FnApiRunner) of ingest → spectral → decomposition on tiny data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bad_inputs import write_cases
from conftest import TINY_RES, tiny_configs
from coarse2fine.preprocess import schema
from coarse2fine.preprocess.beam_jobs import preprocess_all
from coarse2fine.preprocess.dwt import haar_dwt
from coarse2fine.preprocess.schema import decode_image
from coarse2fine.preprocess.schema import tensor_numpy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(demo_folder, tmp_path_factory) -> tuple[Path, dict]:
    """The demo crops, one exact duplicate, and every odd/broken input."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(demo_folder, src, dirs_exist_ok=True)
    first = sorted(src.rglob("*.png"))[0]
    shutil.copy(first, first.parent / "copy_of_first.png")
    bad = write_cases(src / "odd")
    return src, bad


@pytest.fixture(scope="module")
def run(source, tmp_path_factory):
    src, bad = source
    root = tmp_path_factory.mktemp("store")
    cfgs = tiny_configs(str(src), str(root))
    return cfgs, preprocess_all(*cfgs), bad


def manifest(uri: str) -> dict:
    return schema.read_manifest(uri)


def test_counts_reconcile_and_rejections_have_reasons(run, source):
    _, (ing, _, _), bad = run
    counts = manifest(ing.uris["images"])["counts"]
    n_files = sum(1 for p in source[0].rglob("*") if p.is_file())
    n_bad = sum(1 for _, err in bad.values() if err)
    assert counts == {"inputs": n_files, "images": n_files - 1 - n_bad, "duplicates": 1, "rejected": n_bad,
                      "skipped": 0}
    assert manifest(ing.uris["rejected"])["counts"] == counts
    rejected = schema.read_table(ing.uris["rejected"]).to_pylist()
    by_name = {Path(r["source_uri"]).name: r for r in rejected}
    for name, (_, err) in bad.items():
        if err:
            assert by_name[name]["error"] == err and by_name[name]["detail"] and by_name[name]["stage"] == "ingest"
        else:
            assert name not in by_name


def test_images_dataset_contract(run):
    _, (ing, _, _), _ = run
    t = schema.read_table(ing.uris["images"])
    assert t.schema.names == ["key", "source_uri", "split", "width", "height", "label", "image"]
    assert len(set(t.column("key").to_pylist())) == t.num_rows
    assert set(t.column("split").to_pylist()) <= {"train", "validation"}
    classes = manifest(ing.uris["images"])["classes"]
    assert "astronaut" in classes and "odd" in classes
    for row in t.to_pylist():
        assert decode_image(row["image"]).shape == (3, TINY_RES, TINY_RES)
        folder = Path(row["source_uri"]).parent.name
        assert classes[row["label"]] == folder


def test_every_manifest_documents_its_columns_and_class_names(run):
    """Self-describing datasets: ``columns`` names every column a reader sees (from the Parquet
    footer) and ``classes`` the names the ``label`` ids index, in every stage's manifest."""
    _, results, _ = run
    uris = {k: v for r in results for k, v in r.uris.items()}
    classes = manifest(uris["images"])["classes"]
    assert classes == sorted(classes) and len(classes) >= 2
    for stage, uri in uris.items():
        m = manifest(uri)
        names = pq.read_schema(schema.shard_uris(uri)[0]).names
        assert [c["name"] for c in m["columns"]] == names, stage
        assert m["classes"] == classes, stage
    spectral = {c["name"]: c["doc"] for c in manifest(uris["spectral"])["columns"]}
    assert "H's R, G, B, then V's, then D's" in spectral["scale_1"] and "[0, 2^L]" in spectral["scale_0"]
    t = schema.read_table(uris["spectral"])  # the documented value ranges hold
    L = t.column("levels")[0].as_py()
    assert 0 <= tensor_numpy(t.column("scale_0")).min() and tensor_numpy(t.column("scale_0")).max() <= 2 ** L
    for s in range(1, L + 1):  # scale s is level L - s + 1: values within ±2^(L - s)
        assert abs(tensor_numpy(t.column(f"scale_{s}"))).max() <= 2 ** (L - s) + 1e-6


def test_spectral_and_decomposition_rows_match_the_math(run):
    (data, pre, _), (ing, spec, dec), _ = run
    images = {r["key"]: decode_image(r["image"]) for r in schema.read_table(ing.uris["images"]).to_pylist()}
    st = schema.read_table(spec.uris["spectral"])
    assert st.num_rows == len(images)
    key = st.column("key")[0].as_py()
    expected = haar_dwt(images[key].astype(np.float64), pre.levels)
    for s, e in enumerate(expected):
        np.testing.assert_allclose(tensor_numpy(st.column(f"scale_{s}"))[0], e, atol=1e-6)
    dt = schema.read_table(dec.uris["decomposition"])
    assert dt.num_rows == len(images)
    order = pre.decomposition.order
    for i, k in enumerate(dt.column("key").to_pylist()):
        total = tensor_numpy(dt.column("base"))[i] + sum(tensor_numpy(dt.column(f"detail_{j}"))[i] for j in range(1, order + 1))
        np.testing.assert_allclose(total, images[k], atol=1e-5)
        edges = tensor_numpy(dt.column("edge_1"))[i]
        assert edges.min() >= 0 and edges.max() <= 1
    assert set(dt.column("order").to_pylist()) == {order}
    assert all(0 <= f <= 1 for f in dt.column("edge_fraction_1").to_pylist())


def test_readable_by_pyarrow_duckdb_polars(run):
    _, results, _ = run
    for r in results:
        for uri in r.uris.values():
            files = schema.shard_uris(uri)
            n = manifest(uri)["rows"]
            assert sum(pq.read_metadata(f).num_rows for f in files) == n
            listed = "[" + ",".join(f"'{f}'" for f in files) + "]"
            assert duckdb.sql(f"select count(*) from read_parquet({listed})").fetchall()[0][0] == n
            assert pl.read_parquet(files).height == n
    # tensor cells come back as the same row-major values in every reader
    spec = results[1].uris["spectral"]
    first = schema.shard_uris(spec)[0]
    ref = tensor_numpy(pq.read_table(first).column("scale_1"))[0]
    via_polars = np.asarray(pl.read_parquet(first)["scale_1"].to_list()[0], np.float32)
    via_duckdb = np.asarray(duckdb.sql(f"select scale_1 from read_parquet('{first}') limit 1").fetchall()[0][0], np.float32)
    np.testing.assert_array_equal(via_polars.reshape(ref.shape), ref)
    np.testing.assert_array_equal(via_duckdb.reshape(ref.shape), ref)


def test_rerun_reuses_every_stage(run):
    cfgs, results, _ = run
    stamps = {u: manifest(u)["created"] for r in results for u in r.uris.values()}
    again = preprocess_all(*cfgs)
    assert all(r.reused for r in again)
    assert [r.uris for r in again] == [r.uris for r in results]
    assert {u: manifest(u)["created"] for r in again for u in r.uris.values()} == stamps


def test_changed_decomposition_config_gets_new_fingerprint(run):
    (data, pre, store), results, _ = run
    old = results[2].uris["decomposition"]
    old_manifest = json.dumps(manifest(old))
    changed = pre.model_copy(update={"decomposition": pre.decomposition.model_copy(update={"alpha": 5.0})})
    ing, spec, dec = preprocess_all(data, changed, store)
    assert ing.reused and spec.reused and not dec.reused
    assert dec.uris["decomposition"] != old
    assert json.dumps(manifest(old)) == old_manifest


def test_interrupted_stage_is_not_readable_and_is_rebuilt(run):
    cfgs, results, _ = run
    uri = results[1].uris["spectral"]
    rows = manifest(uri)["rows"]
    fs, path = schema.url_to_fs(uri)
    # simulate a crash after some shards were written but before the manifest
    fs.rm(f"{path}/{schema.MANIFEST}")
    pq.write_table(pa.table({"key": ["half-written"]}), f"{path}/part-00000-crashed.parquet")
    with pytest.raises(schema.IncompleteDatasetError):
        schema.read_table(uri)
    _, spec, _ = preprocess_all(*cfgs)
    assert not spec.reused and spec.uris["spectral"] == uri
    t = schema.read_table(uri)
    assert t.num_rows == rows and "half-written" not in t.column("key").to_pylist()
    assert not fs.glob(f"{path}/*crashed*")


def test_parquet_source_with_label_column(run, tmp_path):
    _, (ing, _, _), _ = run
    imgs = schema.read_table(ing.uris["images"]).slice(0, 6)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"image": imgs.column("image"), "cls": pa.array([3, 1, 4, 1, 5, 9], pa.int64())}), src / "a.parquet")
    data, pre, store = tiny_configs(str(src), str(tmp_path / "store"))
    data = data.model_copy(update={"label_from": "cls"})
    ing2, _, _ = preprocess_all(data, pre, store)
    t = schema.read_table(ing2.uris["images"])
    assert t.num_rows == 6 and sorted(t.column("label").to_pylist()) == [1, 1, 3, 4, 5, 9]
    assert all("a.parquet#row=" in u for u in t.column("source_uri").to_pylist())


def test_parquet_class_names_null_cells_and_wrong_types(run, tmp_path):
    """String labels are class names (sorted, label = index); a null image cell is rejected with
    its reason; a wrong-typed column is one line before any Beam work."""
    from coarse2fine.preprocess.errors import UserValueError

    _, (ing, _, _), _ = run
    imgs = schema.read_table(ing.uris["images"]).slice(0, 3).column("image").to_pylist()
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"image": imgs + [None], "cls": ["dog", "cat", "dog", "cat"]}), src / "a.parquet")
    (src / "_SUCCESS").write_bytes(b"")  # a Spark side file is not an input
    data, pre, store = tiny_configs(str(src), str(tmp_path / "store"))
    ing2, _, _ = preprocess_all(data.model_copy(update={"label_from": "cls"}), pre, store)
    m = manifest(ing2.uris["images"])
    assert m["classes"] == ["cat", "dog"] and m["counts"]["rejected"] == 1 and m["counts"]["inputs"] == 4
    labels = dict(zip(*(schema.read_table(ing2.uris["images"]).column(c).to_pylist() for c in ("source_uri", "label"))))
    assert [labels[f"{src}/a.parquet#row={i}"] for i in range(3)] == [1, 0, 1]
    assert schema.read_table(ing2.uris["rejected"]).column("error").to_pylist() == ["NullImage"]
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"image": [1, 2], "cls": [0.5, 1.5]}), bad / "b.parquet")
    data, pre, store = tiny_configs(str(bad), str(tmp_path / "store"))
    with pytest.raises(UserValueError, match="column 'image' .* holds int64, not image bytes"):
        preprocess_all(data, pre, store)
    pq.write_table(pa.table({"image": imgs[:2], "cls": [0.5, 1.5]}), bad / "b.parquet")
    with pytest.raises(UserValueError, match="label column 'cls' holds double"):
        preprocess_all(data.model_copy(update={"label_from": "cls"}), pre, store)


def test_empty_source_is_one_line_and_hidden_files_are_counted(tmp_path):
    from coarse2fine.preprocess.errors import UserValueError
    from coarse2fine.preprocess.sources import list_source

    src = tmp_path / "src"
    (src / ".thumbs").mkdir(parents=True)
    (src / ".DS_Store").write_bytes(b"x")
    (src / ".thumbs" / "a.png").write_bytes(b"x")
    data, pre, store = tiny_configs(str(src), str(tmp_path / "store"))
    with pytest.raises(UserValueError, match=r"holds no inputs \(2 hidden files skipped\)"):
        preprocess_all(data, pre, store)
    (src / "img.png").write_bytes(b"not really")
    assert list_source(data).skipped == 2 and list_source(data).num_inputs == 1


def test_two_beam_workers_give_the_same_datasets(run, tmp_path):
    (data, pre, _), results, _ = run
    _, pre2, store2 = tiny_configs(data.source, str(tmp_path / "store2"), num_workers=2)
    again = preprocess_all(data, pre2, store2)
    for a, b in zip(results, again):
        for name in a.uris:
            ta = schema.read_table(a.uris[name]).sort_by("source_uri" if name == "rejected" else "key")
            tb = schema.read_table(b.uris[name]).sort_by("source_uri" if name == "rejected" else "key")
            assert ta.equals(tb), name


def test_grown_source_ingests_only_new_inputs(demo_folder, tmp_path):
    """Nightly uploads: a second ingest carries the first one's rows over and reads only the new
    files; a new file that duplicates a carried image counts as a duplicate; counts reconcile."""
    from coarse2fine.preprocess.beam_jobs import ingest, spectral

    src = tmp_path / "src"
    files = sorted(demo_folder.rglob("*.png"))
    by_class: dict[str, list[Path]] = {}
    for f in files:
        by_class.setdefault(f.parent.name, []).append(f)
    new = [fs[-1] for fs in by_class.values() if len(fs) > 1]  # later uploads of known classes
    old = [f for f in files if f not in new]
    assert new
    for f in old:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / f.parent.name / f.name)
    data, pre, store = tiny_configs(str(src), str(tmp_path / "store"))
    first = ingest(data, pre, store)
    first_spec = spectral(first.uris["images"], data, pre, store)
    for f in new:
        shutil.copy(f, src / f.parent.name / f.name)
    shutil.copy(old[0], src / old[0].parent.name / "again.png")  # duplicate of a carried image
    second = ingest(data, pre, store)
    m = manifest(second.uris["images"])
    assert m["inputs"]["carried_over_from"] == first.uris["images"]
    assert m["counts"] == {"inputs": len(files) + 1, "images": len(files), "duplicates": 1, "rejected": 0, "skipped": 0}
    keys = schema.read_table(second.uris["images"]).column("key").to_pylist()
    assert set(schema.read_table(first.uris["images"]).column("key").to_pylist()) < set(keys)
    assert len(keys) == len(set(keys)) == len(files)
    # per-image stages carry the old rows over too and compute only the new images
    spec = spectral(second.uris["images"], data, pre, store).uris["spectral"]
    assert manifest(spec)["inputs"]["carried_over_from"] == first_spec.uris["spectral"]
    assert sorted(schema.read_table(spec, ["key"]).column("key").to_pylist()) == sorted(keys)
    # a removed input breaks the append-only assumption: everything is read again
    (src / old[0].parent.name / "again.png").unlink()
    (src / old[1].parent.name / old[1].name).unlink()
    third = manifest(ingest(data, pre, store).uris["images"])
    assert "carried_over_from" not in third["inputs"] and third["counts"]["images"] == len(files) - 1
