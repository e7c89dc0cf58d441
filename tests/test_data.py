"""The streaming training loader (``train/data.py``) against brute-force reads of whole datasets:
rank partition, epoch coverage, exact resume, one shard at a time, the decomposition join."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from coarse2fine.preprocess import schema, storage
from coarse2fine.train import data

LAYOUT = [schema.TokenColumn("ids", (2,), "int32", 100, "scale"), schema.TokenColumn("more", (3,), "int32", 100, "scale")]
NULL = 7


def key(i: int) -> str:
    return hashlib.sha1(str(i).encode()).hexdigest()  # key order is unrelated to i


def write_tokens(uri: str, sizes: list[int]) -> dict[str, dict]:
    """A ``tokens`` dataset with shards of ``sizes`` rows (every 4th row in ``val``, every 5th
    unlabelled); returns each row by key, as written."""
    rows, i, shards = {}, 0, []
    sch = schema.tokens_schema(LAYOUT)
    os.makedirs(uri)
    for s, size in enumerate(sizes):
        part = []
        for _ in range(size):
            part.append({"key": key(i), "label": None if i % 5 == 0 else i % 3, "split": "val" if i % 4 == 0 else "train",
                         "ids": np.array([i, -i], np.int32), "more": np.array([i, i + 1, i + 2], np.int32)})
            rows[part[-1]["key"]] = part[-1]
            i += 1
        shards.append(storage.write_shard(uri, f"part-{s:05d}-x.parquet", schema.table_from_rows(part, sch)))
    storage.write_manifest(uri, stage="tokens", fp="f", config={}, inputs={}, shards=shards, code="c")
    return rows


def stream_of(uri: str, rank: int = 0, world: int = 1, seed: int = 0) -> data.ShardStream:
    return data.ShardStream(data.rank_rows(uri, "train", rank, world), ["key", "label", *[c.name for c in LAYOUT]],
                            lambda t: data.decode_tokens(t, LAYOUT, NULL) | {"i": torch.tensor(
                                [int(v) for v in schema.tensor_numpy(t.column("ids"))[:, 0]])}, seed, rank)


@pytest.fixture
def tokens(tmp_path):
    uri = str(tmp_path / "tokens")
    return uri, write_tokens(uri, [7, 3, 12, 1, 9, 8])


def test_ranks_partition_the_train_rows(tokens):
    uri, rows = tokens
    train = {k for k, r in rows.items() if r["split"] == "train"}
    seen = []
    for rank in range(3):
        rr = data.rank_rows(uri, "train", rank, 3)
        t = pa.concat_tables([pq.read_table(rr.shards[s]).slice(r, 1) for s, r in zip(rr.shard, rr.row)])
        seen.append(t.column("key").to_pylist())
        assert set(t.column("split").to_pylist()) == {"train"}
    assert sorted(sum(seen, [])) == sorted(train)  # disjoint and complete
    assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_every_epoch_visits_each_row_once_with_its_own_values(tokens):
    uri, rows = tokens
    stream = stream_of(uri, rank=1, world=2)
    n = len(stream)
    got = [stream.batch(step, 5) for step in range(4 * n // 5)]  # 4 epochs
    i = torch.cat([b["i"] for b in got]).tolist()
    by_i = {int(r["ids"][0]): r for r in rows.values()}
    for e in range(4):
        epoch = i[e * n:(e + 1) * n]
        assert len(set(epoch)) == n  # each of the rank's rows once
        assert all(by_i[j]["split"] == "train" for j in epoch)
    assert i[:n] != i[n:2 * n]  # reshuffled per epoch
    assert i[:n] != sorted(i[:n], key=lambda j: key(j))  # not key order
    rr = stream.rows  # the batch is in the order of its indices: the rows read back one by one
    for step, b in enumerate(got):
        want = [pq.read_table(rr.shards[rr.shard[j]]).slice(rr.row[j], 1).column("key")[0].as_py()
                for j in stream.indices(step, 5)]
        assert [key(j) for j in b["i"].tolist()] == want
    for b in got:  # each row's values are its own (checked against the rows as written)
        for j, tok, lab in zip(b["i"].tolist(), b["tokens"].tolist(), b["label"].tolist()):
            r = by_i[j]
            assert tok == [j, -j, j, j + 1, j + 2]
            assert lab == (NULL if r["label"] is None else r["label"])


def test_batch_is_a_pure_function_of_seed_rank_and_step(tokens):
    uri, _ = tokens
    a = stream_of(uri, seed=3)
    first = [a.batch(s, 4)["i"].tolist() for s in range(12)]
    resumed = stream_of(uri, seed=3)  # a fresh worker after a crash, starting at step 7
    assert [resumed.batch(s, 4)["i"].tolist() for s in range(7, 12)] == first[7:]
    assert stream_of(uri, seed=4).batch(0, 4)["i"].tolist() != first[0]
    assert stream_of(uri, seed=3, rank=1, world=2).batch(0, 4)["i"].tolist() != first[0]


def test_an_epoch_reads_each_shard_once_and_holds_at_most_three(tmp_path):
    """Memory stays flat: the whole dataset is never decoded at once (the in-memory loader held
    every row from the start): two shards kept, one prefetched."""
    uri = str(tmp_path / "tokens")
    write_tokens(uri, [10] * 12)
    stream = stream_of(uri)
    held = []
    for step in range(len(stream) // 4):
        stream.batch(step, 4)
        held.append(stream.rows_held)
    assert stream.shards_read == 12
    assert max(held) <= 3 * 8 < len(stream)  # a shard has 7 or 8 train rows (rows 10s … 10s + 9, every 4th is val)


def test_batches_larger_than_a_shard(tokens):
    uri, rows = tokens
    stream = stream_of(uri)
    b = stream.batch(0, len(stream) + 3)["i"].tolist()  # one epoch and 3 rows of the next
    assert sorted(b[:len(stream)]) == sorted(int(r["ids"][0]) for r in rows.values() if r["split"] == "train")


def write_decomposition(uri: str, keys: list[str], sizes: list[int], order: int = 3) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    sch = pa.schema([("key", pa.string())] + [(c, schema.tensor_type((3, 4, 4), "float16"))
                                              for c in ["base"] + [f"detail_{j}" for j in range(1, order + 1)]])
    rows, shards, at = {}, [], 0
    os.makedirs(uri)
    for s, size in enumerate(sizes):
        part = [{"key": k, "base": rng.random((3, 4, 4)).astype(np.float16),
                 **{f"detail_{j}": rng.normal(size=(3, 4, 4)).astype(np.float16) for j in range(1, order + 1)}}
                for k in keys[at:at + size]]
        at += size
        rows |= {r["key"]: r for r in part}
        shards.append(storage.write_shard(uri, f"part-{s:05d}-y.parquet", schema.table_from_rows(part, sch)))
    storage.write_manifest(uri, stage="decomposition", fp="f", config={"order": order}, inputs={}, shards=shards, code="c")
    return rows


def test_bases_join_reads_the_asked_rows_by_key(tmp_path):
    keys = [key(i) for i in range(10)]
    rows = write_decomposition(str(tmp_path / "dec"), keys, [4, 3, 3])
    ask = [keys[8], keys[0], keys[5], keys[8]]
    got = data.load_bases(str(tmp_path / "dec"), ask, 2)  # (4, 2, 3, 4, 4)
    for i, k in enumerate(ask):  # B_3 = base, B_2 = B_3 + D_3, B_1 = B_2 + D_2 (CART eq. 10)
        r = {c: v.astype(np.float32) for c, v in rows[k].items() if c != "key"}
        np.testing.assert_allclose(got[i, 1].numpy(), r["base"] + r["detail_3"], rtol=1e-6)
        np.testing.assert_allclose(got[i, 0].numpy(), r["base"] + r["detail_3"] + r["detail_2"], rtol=1e-6)
    with pytest.raises(data.UserValueError, match="no row for 1 of 2"):
        data.load_bases(str(tmp_path / "dec"), [keys[1], key(99)], 2)
