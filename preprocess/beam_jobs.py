"""Beam graphs: ingest → ``images``/``rejected``, ``spectral`` (Haar DWT), ``decomposition`` (AT),
and the generic per-image stage (``run_image_stage``, also used for ``tokens``).

Each job is a thin Beam graph around the pure functions of ``images``, ``dwt`` and
``mumford_shah`` (img2dataset's reader / worker / writer split): the driver lists inputs
(``sources``; only new ones when ``carry_over`` finds an earlier ingest of the same source), workers
transform one element at a time, writers group rows into Parquet shards; the driver then writes
the manifest last. Only bytes and strings travel between transforms, never numpy arrays.

Each stage is a plain function usable without Prefect; it returns the URIs it wrote (or reused).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from coarse2fine.preprocess import (beam_worker, carry_over, commit_protocol, dwt, images, mumford_shah, schema, sources,
                                    storage)
from coarse2fine.preprocess.errors import UserValueError
from coarse2fine.preprocess.config import (
    DataConfig,
    PreprocessConfig,
    StorageConfig,
    check_levels,
)

log = logging.getLogger(__name__)

@dataclass
class StageResult:
    """What a stage wrote (or found complete and reused)."""

    stage: str
    uris: dict[str, str]
    rows: dict[str, int]
    reused: bool
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- runner


def make_pipeline(pre: PreprocessConfig) -> beam.Pipeline:
    """A Beam pipeline on the configured runner.

    ``local`` forces the in-process FnApiRunner (the plain DirectRunner first tries to download
    the Prism runner, which fails offline); ``num_workers > 1`` runs that many worker processes,
    started through ``preprocess/beam_worker.py`` so that they log to the console only at the level
    the driver's ``apache_beam`` logger has (the CLI: errors; ``c2f --verbose``: everything). Beam
    then warns that ``in_memory`` mode gives no parallelism: it names the running mode, which is no
    longer what picks the workers (our environment is), and the workers do run in parallel.
    Any other value is passed as ``--runner`` together with ``runner_options`` (Dataflow, Flink…).
    """
    if pre.runner == "local":
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.job.utils import dict_to_struct
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo
        from apache_beam.transforms.environments import SubprocessSDKEnvironment

        level = logging.getLevelName(logging.getLogger("apache_beam").getEffectiveLevel())
        flags = [f"--direct_num_workers={pre.num_workers}", f"--default_sdk_harness_log_level={level}"]
        if pre.num_workers == 1:
            return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(flags + pre.runner_options))
        # the harness reads its log level from the provision info, which FnApiRunner leaves empty
        provision = ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(
            retrieval_token="unused-retrieval-token",
            pipeline_options=dict_to_struct({"default_sdk_harness_log_level": level})))
        command = f"{shlex.quote(sys.executable)} -m {beam_worker.__name__} --log-level {level}"
        runner = FnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command),
                             provision_info=provision)
        return beam.Pipeline(runner=runner, options=PipelineOptions(flags + pre.runner_options))
    return beam.Pipeline(options=PipelineOptions([f"--runner={pre.runner}", *pre.runner_options]))


def _counter(result: beam.runners.runner.PipelineResult, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return int(sum(c.committed if c.committed is not None else c.attempted for c in found))


# ---------------------------------------------------------------- shards


def _shard_of(ident: str, num_shards: int) -> int:
    return int(hashlib.sha1(ident.encode()).hexdigest()[:8], 16) % num_shards


class _WriteShards(beam.PTransform):
    """Group ``(ident, row)`` pairs into ``num_shards`` Parquet shards built by ``make_rows``.

    ``make_rows(items)`` turns the grouped ``(ident, payload)`` items of one shard into row dicts
    of ``table_schema`` (this is where heavy per-row work runs, so it stays inside the writer and
    arrays never cross a transform boundary).
    """

    def __init__(self, uri: str, run_id: str, num_shards: int, table_schema, make_rows) -> None:
        super().__init__()
        self.uri, self.run_id, self.num_shards = uri, run_id, num_shards
        self.table_schema, self.make_rows = table_schema, make_rows

    def expand(self, pcoll):
        uri, run_id, n, sch, make_rows = self.uri, self.run_id, self.num_shards, self.table_schema, self.make_rows

        def write(shard: int, items: Iterable) -> dict:
            ordered = sorted(items, key=lambda kv: kv[0])  # deterministic row order
            table = schema.table_from_rows(list(make_rows(ordered)), sch)
            return storage.write_shard(uri, storage.shard_name(run_id, shard), table)

        return (
            pcoll
            | "AssignShard" >> beam.Map(lambda kv: (_shard_of(kv[0], n), kv))
            | "GroupShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.MapTuple(write)
        )


def _manifest_fields(attempt: commit_protocol.Attempt, table_schema, carried: list[dict], classes: list[str] | None,
                     **manifest) -> dict:
    """:func:`storage.write_manifest`'s fields for an attempt: the shards the run wrote plus any
    ``carried`` over (an empty shard if none, so empty datasets stay readable), and what makes the
    dataset self-describing: its ``columns`` (:func:`schema.column_docs`) and the class names its
    ``label`` ids index (``classes``, from the images dataset)."""
    shards = carried + storage.list_shards(attempt.folder, attempt.run_id)
    if not shards:
        shards = [storage.write_shard(attempt.folder, storage.shard_name(attempt.run_id, 0), table_schema.empty_table())]
    return manifest | {"shards": shards, "extra": {"classes": classes, "columns": [  # a list: the schema's order
        {"name": name, "doc": doc} for name, doc in schema.column_docs(table_schema).items()]}}


def _num_shards(rows: int, pre: PreprocessConfig) -> int:
    """At least one shard per worker: per-image work runs in the shard writers, so fewer shards
    than workers would leave workers idle (measured: 2 workers on 1 shard were 3× slower)."""
    return max(1, min(rows, max(math.ceil(rows / pre.rows_per_shard), pre.num_workers)))


# ---------------------------------------------------------------- ingest


class _Normalise(beam.DoFn):
    """Worker: decode one input; main output ``(key, row)``, tagged output ``rejected`` rows."""

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    def process(self, item):
        source_uri, label, payload, from_file = item
        try:
            raw = sources.read_file(source_uri) if from_file else payload
            if raw is None:
                raise images.RejectedImage("NullImage", f"the {self.data.image_column!r} cell is null")
            norm = images.normalise_image(raw, self.data.resolution, self.data.min_size, self.data.max_pixels)
        except images.RejectedImage as e:
            yield beam.pvalue.TaggedOutput("rejected", _rejected(source_uri, e.error, e.detail))
            return
        except Exception as e:  # noqa: BLE001 — per-input isolation: one input never stops the run
            yield beam.pvalue.TaggedOutput("rejected", _rejected(source_uri, type(e).__name__, str(e)[:500]))
            return
        row = {
            "key": norm.key,
            "source_uri": source_uri,
            "split": images.split_of(norm.key, self.data.validation_fraction),
            "width": norm.width,
            "height": norm.height,
            "label": label,
            "image": norm.png,
        }
        yield norm.key, row


def _rejected(source_uri: str, error: str, detail: str) -> tuple[str, dict]:
    return source_uri, {"source_uri": source_uri, "stage": "ingest", "error": error, "detail": detail}


def _keep_first(key: str, rows: Iterable[dict], known: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict]]:
    """Deduplicate: keep the row with the smallest source URI, count the others; an image already
    in the carried-over rows (``known`` keys) is a duplicate as a whole."""
    rows = sorted(rows, key=lambda r: r["source_uri"])
    dropped = len(rows) if key in known else len(rows) - 1
    if dropped:
        Metrics.counter("ingest", "duplicates").inc(dropped)
    if key not in known:
        yield key, rows[0]


def ingest(data: DataConfig, pre: PreprocessConfig, store: StorageConfig) -> StageResult:
    """Ingest ``data.source`` into the ``images`` and ``rejected`` datasets.

    Reconciles ``inputs == images + duplicates + rejected`` and records the counts in the
    manifest; a mismatch raises instead of writing a manifest.
    """
    t0 = time.perf_counter()
    listing = sources.list_source(data)
    if listing.num_inputs == 0:
        raise UserValueError(f"data.source {data.source} holds no inputs ({listing.skipped} hidden files skipped): "
                             "point it at a folder of images or a Parquet file/folder")
    config = data.model_dump() | {"listing": listing.signature()}
    code = storage.code_version(images, schema, storage, sources, carry_over, sys.modules[__name__])
    fp = storage.fingerprint("ingest", config, [], code)
    images_uri = storage.dataset_uri(store.root, "images", fp)
    rejected_uri = storage.dataset_uri(store.root, "rejected", fp)
    done = schema.read_manifest(images_uri)
    if done is not None and schema.read_manifest(rejected_uri) is not None:
        log.info("ingest: reusing complete dataset %s", images_uri)
        for uri in (images_uri, rejected_uri):
            commit_protocol.sweep(uri)
        return _reused_ingest(images_uri, rejected_uri)
    run_id = storage.new_run_id()
    attempts = {"images": commit_protocol.begin(images_uri, run_id),
                "rejected": commit_protocol.begin(rejected_uri, run_id)}
    try:
        return _ingest_into(attempts, data, pre, store, listing, config, code, fp, t0)
    except Exception:
        for a in attempts.values():
            commit_protocol.discard(a)
        raise


def _reused_ingest(images_uri: str, rejected_uri: str) -> StageResult:
    done = schema.read_manifest(images_uri)
    return StageResult("ingest", {"images": images_uri, "rejected": rejected_uri},
                       {"images": done["rows"], "rejected": done["counts"]["rejected"]}, True, counts=done["counts"])


def _ingest_into(attempts: dict[str, commit_protocol.Attempt], data: DataConfig, pre: PreprocessConfig,
                 store: StorageConfig, listing: sources.SourceListing, config: dict, code: str, fp: str,
                 t0: float) -> StageResult:
    """The Beam job and the commit of :func:`ingest`, writing into the run's ``attempts``."""
    images_uri, rejected_uri = attempts["images"].uri, attempts["rejected"].uri
    run_id = attempts["images"].run_id
    prev = carry_over.previous_ingest(store, config, listing, code)
    entries = [(u, n) for u, n in listing.entries if prev is None or (u, n) not in prev.seen]
    known = frozenset() if prev is None else frozenset(schema.read_table(prev.images_uri, ["key"]).column("key").to_pylist())
    new_inputs = len(entries) if listing.kind == "files" else sum(n for _, n in entries)
    n_shards = _num_shards(new_inputs, pre)
    if prev is not None:
        log.info("ingest: carrying over %d images of %s; reading only the %d new inputs",
                 prev.manifest["rows"], prev.images_uri, new_inputs)
    log.info("ingest: %d inputs from %s -> %s (%d shards)", new_inputs, data.source, images_uri, n_shards)

    p = make_pipeline(pre)
    if listing.kind == "files":
        items = p | "ListFiles" >> beam.Create(
            [(uri, listing.labels[uri], None, True) for uri, _ in entries], reshuffle=True
        )
    else:
        items = (
            p
            | "ListParquet" >> beam.Create([uri for uri, _ in entries])
            | "ReadRows" >> beam.FlatMap(sources.parquet_rows, data, listing.classes)
        )
    out = items | "Normalise" >> beam.ParDo(_Normalise(data)).with_outputs("rejected", main="ok")
    (
        out.ok
        | "ByKey" >> beam.GroupByKey()
        | "Dedupe" >> beam.FlatMapTuple(_keep_first, known)
        | "WriteImages" >> _WriteShards(attempts["images"].folder, run_id, n_shards, schema.IMAGES,
                                        lambda kv: (r for _, r in kv))
    )
    out.rejected | "WriteRejected" >> _WriteShards(
        attempts["rejected"].folder, run_id, _num_shards(1, pre), schema.REJECTED, lambda kv: (r for _, r in kv)
    )
    result = p.run()
    result.wait_until_finish()

    carried = {"images": [], "rejected": []}
    old_counts = {"images": 0, "duplicates": 0, "rejected": 0}
    if prev is not None:
        carried = {"images": carry_over.carry_shards(prev.images_uri, attempts["images"].folder, prev.manifest),
                   "rejected": carry_over.carry_shards(prev.rejected_uri, attempts["rejected"].folder,
                                                       schema.read_manifest(prev.rejected_uri))}
        old_counts = {k: prev.manifest["counts"][k] for k in old_counts}
    rej_shards = storage.list_shards(attempts["rejected"].folder, run_id)
    img_shards = storage.list_shards(attempts["images"].folder, run_id)
    counts = {
        "skipped": listing.skipped,  # hidden files, not inputs
        "inputs": listing.num_inputs,
        "images": old_counts["images"] + sum(s["rows"] for s in img_shards),
        "duplicates": old_counts["duplicates"] + _counter(result, "duplicates"),
        "rejected": old_counts["rejected"] + sum(s["rows"] for s in rej_shards),
    }
    if counts["inputs"] != counts["images"] + counts["duplicates"] + counts["rejected"]:
        raise RuntimeError(f"ingest counts do not reconcile, no manifest written: {counts}")
    carry_over.write_listing(attempts["images"].folder, listing)
    inputs = {"source": data.source} | ({"carried_over_from": prev.images_uri} if prev else {})
    meta = dict(stage="ingest", fp=fp, config=config, inputs=inputs, code=code, counts=counts)
    parts = [(attempts[name], _manifest_fields(attempts[name], table_schema, carried[name], listing.classes, **meta))
             for name, table_schema in (("rejected", schema.REJECTED), ("images", schema.IMAGES))]
    if not commit_protocol.commit(parts):
        log.info("ingest: another run completed %s first; reusing it", images_uri)
        return _reused_ingest(images_uri, rejected_uri)
    log.info("ingest: %s", counts)
    return StageResult("ingest", {"images": images_uri, "rejected": rejected_uri},
                       {"images": counts["images"], "rejected": counts["rejected"]}, False,
                       time.perf_counter() - t0, counts)


# ---------------------------------------------------------------- per-image stages


def _image_rows(shard_uri: str) -> Iterator[tuple[str, dict]]:
    """``(key, {"image": png, "label": label, "split": split})`` for every row of an images shard."""
    table = schema.read_shard(shard_uri, ["key", "image", "label", "split"])
    for key, png, label, split in zip(*(table.column(c).to_pylist() for c in ("key", "image", "label", "split"))):
        yield key, {"image": png, "label": label, "split": split}


def _decomposition_rows(shard_uri: str, columns: list[str]) -> Iterator[tuple[str, dict]]:
    """``(key, {"order": n, column: float32 bytes, …})`` for every row of a decomposition shard
    (bytes, not arrays, travel between transforms; each array is (3, H, W))."""
    table = schema.read_shard(shard_uri, ["key", "order"] + columns)
    arrays = {c: schema.tensor_numpy(table.column(c)).astype(np.float32) for c in columns}
    for i, (key, order) in enumerate(zip(table.column("key").to_pylist(), table.column("order").to_pylist())):
        yield key, {"order": order} | {c: a[i].tobytes() for c, a in arrays.items()}


def _with_decomposition(item: tuple[str, dict]) -> Iterator[tuple[str, dict]]:
    """A CoGroupByKey result → the image row with its ``decomposition`` (rows of images not in
    this run, e.g. carried over, drop out; the driver checked that every image has a row)."""
    key, grouped = item
    for row in grouped["images"]:
        yield key, row | {"decomposition": grouped["decomposition"][0]}


def run_image_stage(
    stage: str,
    images_uri: str,
    pre: PreprocessConfig,
    store: StorageConfig,
    config: dict,
    code: str,
    table_schema,
    make_rows,
    join: tuple[str, list[str]] | None = None,
) -> StageResult:
    """Driver of a per-image Beam stage: fingerprint, reuse, Beam map, manifest.

    ``make_rows(items)`` turns one output shard's ``[(key, {"image", "label", "split"}), …]`` (sorted by
    key) into row dicts of ``table_schema``; it runs on the Beam workers (batch work goes there).
    ``join = (decomposition_uri, columns)`` adds each image's ``decomposition`` row (those columns
    as float32 bytes, and its ``order``), joined by key in the Beam graph (CoGroupByKey)."""
    t0 = time.perf_counter()
    src = schema.read_manifest(images_uri)
    if src is None:
        raise schema.IncompleteDatasetError(f"{images_uri} is incomplete: run ingest first")
    joined = [schema.read_manifest(join[0])["fingerprint"]] if join else []
    fp = storage.fingerprint(stage, config, [src["fingerprint"]] + joined, code)
    uri = storage.dataset_uri(store.root, stage, fp)
    done = schema.read_manifest(uri)
    if done is not None:
        log.info("%s: reusing complete dataset %s", stage, uri)
        commit_protocol.sweep(uri)
        return StageResult(stage, {stage: uri}, {stage: done["rows"]}, True)
    attempt = commit_protocol.begin(uri, storage.new_run_id())
    try:
        written = _image_stage_into(attempt, stage, src, images_uri, pre, store, config, code, fp,
                                    table_schema, make_rows, join)
    except Exception:
        commit_protocol.discard(attempt)
        raise
    if written is None:
        log.info("%s: another run completed %s first; reusing it", stage, uri)
        return StageResult(stage, {stage: uri}, {stage: schema.read_manifest(uri)["rows"]}, True)
    return StageResult(stage, {stage: uri}, {stage: written}, False, time.perf_counter() - t0)


def _image_stage_into(attempt: commit_protocol.Attempt, stage: str, src: dict, images_uri: str, pre: PreprocessConfig,
                      store: StorageConfig, config: dict, code: str, fp: str, table_schema, make_rows,
                      join: tuple[str, list[str]] | None) -> int | None:
    """The Beam job and the commit of :func:`run_image_stage` into ``attempt``: the rows published,
    or None when another run completed the dataset first."""
    uri, run_id = attempt.uri, attempt.run_id
    carried, todo, inputs = [], schema.shard_uris(images_uri), {"images": images_uri}
    prev_images = src["inputs"].get("carried_over_from")
    prev_src = schema.read_manifest(prev_images) if prev_images else None
    prev_uri = storage.dataset_uri(store.root, stage, storage.fingerprint(stage, config, [prev_src["fingerprint"]], code)) \
        if prev_src else None
    prev = schema.read_manifest(prev_uri) if prev_uri else None
    if prev is not None:  # the images carried over by ingest keep their rows here too
        carried = carry_over.carry_shards(prev_uri, attempt.folder, prev)
        old = {s["name"] for s in prev_src["shards"]}
        todo = [schema.join(images_uri, s["name"]) for s in src["shards"] if s["name"] not in old]
        inputs["carried_over_from"] = prev_uri
        log.info("%s: carrying over %d rows of %s", stage, prev["rows"], prev_uri)
    if join:
        inputs["decomposition"] = join[0]
    new_rows = src["rows"] - sum(s["rows"] for s in carried)
    log.info("%s: %d images -> %s", stage, new_rows, uri)
    if todo:
        p = make_pipeline(pre)
        rows = p | "ListShards" >> beam.Create(todo, reshuffle=True) | "ReadImages" >> beam.FlatMap(_image_rows)
        if join:
            parts = schema.shard_uris(join[0])
            dec = (p | "ListDecomposition" >> beam.Create(parts, reshuffle=True)
                   | "ReadDecomposition" >> beam.FlatMap(_decomposition_rows, join[1]))
            rows = {"images": rows, "decomposition": dec} | "JoinByKey" >> beam.CoGroupByKey() \
                | "WithDecomposition" >> beam.FlatMap(_with_decomposition)
        rows | "Write" >> _WriteShards(attempt.folder, run_id, _num_shards(max(new_rows, 1), pre), table_schema, make_rows)
        p.run().wait_until_finish()
    fields = _manifest_fields(attempt, table_schema, carried, src.get("classes"), stage=stage, fp=fp, config=config,
                              inputs=inputs, code=code)
    rows = sum(s["rows"] for s in fields["shards"])
    if rows != src["rows"]:
        raise RuntimeError(f"{stage} wrote {rows} rows for {src['rows']} images; nothing published")
    return rows if commit_protocol.commit([(attempt, fields)]) else None


def spectral_row(key: str, png: bytes, levels: int, dtype: str) -> dict:
    """One ``spectral`` row: Haar DWT of the image in [0, 1]."""
    scales = dwt.haar_dwt(schema.decode_image(png).astype(np.float64), levels)
    row = {"key": key, "wavelet": schema.WAVELET, "levels": levels}
    row.update({f"scale_{s}": c.astype(dtype) for s, c in enumerate(scales)})
    return row


def spectral(images_uri: str, data: DataConfig, pre: PreprocessConfig, store: StorageConfig) -> StageResult:
    """Multi-level Haar DWT of every image (pywavelets), ``spectral`` dataset."""
    check_levels(data, pre)
    config = {"levels": pre.levels, "dtype": pre.dtype, "wavelet": schema.WAVELET}
    code = storage.code_version(dwt, images, schema, storage, sys.modules[__name__])
    levels, dtype = pre.levels, pre.dtype
    return run_image_stage(
        "spectral", images_uri, pre, store, config, code,
        schema.spectral_schema(data.resolution, levels, dtype),
        lambda items: (spectral_row(k, row["image"], levels, dtype) for k, row in items),
    )


def decomposition_row(key: str, png: bytes, order: int, params: mumford_shah.ATParams, dtype: str) -> dict:
    """One ``decomposition`` row: B_n, D_1..D_n, edge maps and per-layer diagnostics."""
    d = mumford_shah.decompose(schema.decode_image(png).astype(np.float64), order, params)
    row = {"key": key, "order": order, "alpha": params.alpha, "lambda_": params.lambda_,
           "epsilon": params.epsilon, "base": d.base.astype(dtype)}
    for k in range(1, order + 1):
        row[f"detail_{k}"] = d.details[k - 1].astype(dtype)
        row[f"edge_{k}"] = d.edges[k - 1].astype(dtype)
        row[f"iterations_{k}"] = d.iterations[k - 1]
        row[f"residual_{k}"] = d.residuals[k - 1]
        row[f"edge_fraction_{k}"] = d.edge_fraction[k - 1]
        row[f"tv_reduction_{k}"] = d.tv_reduction[k - 1]
    return row


def decomposition(images_uri: str, data: DataConfig, pre: PreprocessConfig, store: StorageConfig) -> StageResult:
    """Hierarchical AT base/detail decomposition of every image, ``decomposition`` dataset."""
    cfg = pre.decomposition
    params = mumford_shah.ATParams(
        alpha=cfg.alpha, lambda_=cfg.lambda_, epsilon=cfg.epsilon, max_outer=cfg.max_outer,
        outer_tol=cfg.outer_tol, cg_tol=cfg.cg_tol, cg_maxiter=cfg.cg_maxiter,
    )
    config = cfg.model_dump() | {"dtype": pre.dtype}
    code = storage.code_version(mumford_shah, images, schema, storage, sys.modules[__name__])
    order, dtype = cfg.order, pre.dtype
    return run_image_stage(
        "decomposition", images_uri, pre, store, config, code,
        schema.decomposition_schema(data.resolution, order, dtype),
        lambda items: (decomposition_row(k, row["image"], order, params, dtype) for k, row in items),
    )


def preprocess_all(data: DataConfig, pre: PreprocessConfig, store: StorageConfig) -> list[StageResult]:
    """ingest → spectral → decomposition; finished stages with the same fingerprint are reused."""
    check_levels(data, pre)
    ing = ingest(data, pre, store)
    images_uri = ing.uris["images"]
    return [ing, spectral(images_uri, data, pre, store), decomposition(images_uri, data, pre, store)]
