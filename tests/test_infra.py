"""The scale-out configuration under ``infra/`` agrees with the code it drives.

Nothing here reaches a cloud: each file is checked against the tool that will read it, as far as
that tool can be run offline — Ray's own cluster-config validation, the ``c2f`` click commands and
:func:`load_config`, Beam's option parser, ``mlflow server --help``, ``prefect worker start --help``
— and against the repository (files the Dockerfile copies, versions it pins).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from coarse2fine.pipelines.config import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DEMO = REPO / "configs" / "demo.yaml"
BIN = Path(sys.executable).parent  # the venv's console scripts (c2f, mlflow, prefect, ray)
IMAGE_REPO = "us-docker.pkg.dev/PROJECT/c2f/worker"
WORK_POOL = "c2f-process"

EXPECTED = [
    "Dockerfile",
    "README.md",
    "ray/cluster-gcp.yaml",
    "ray/rayjob.yaml",
    "beam/dataflow.yaml",
    "beam/flink.yaml",
    "mlflow/server.sh",
]


def _load(rel: str) -> dict:
    return yaml.safe_load((INFRA / rel).read_text())


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def _package_folders() -> set[str]:
    """The repository folders setup.py maps into the ``coarse2fine`` package (``ROOTS`` + the root's folder)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "ROOTS":
                found |= set(ast.literal_eval(node.value))
            elif node.targets[0].id == "package_dir" and isinstance(node.value, ast.Dict):
                found |= set(ast.literal_eval(node.value).values())
    assert "c2f_root" in found and len(found) > 1, "setup.py changed shape: update _package_folders"
    return found


def _console_scripts() -> set[str]:
    return {ep.name for ep in metadata.distribution("coarse2fine").entry_points if ep.group == "console_scripts"}


# ------------------------------------------------------------------ all files


def test_expected_files_exist_and_readme_names_them():
    readme = (INFRA / "README.md").read_text()
    for rel in EXPECTED:
        assert (INFRA / rel).is_file(), rel
        if rel != "README.md":
            assert rel in readme, f"infra/README.md does not mention {rel}"


@pytest.mark.parametrize(
    "path", sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml")), ids=lambda p: str(p.relative_to(INFRA))
)
def test_yaml_parses_to_a_mapping(path: Path):
    # prefect.yaml (written elsewhere) is included when it exists: Prefect reads it with safe_load too.
    assert isinstance(yaml.safe_load(path.read_text()), dict)


# ------------------------------------------------------------------ prefect.yaml


def test_prefect_deployments_name_the_flow_its_parameters_and_the_pool():
    """Each deployment's entrypoint imports to the ``full-pipeline`` flow, its parameters are
    parameters of that flow and pass its validation, its configs exist, its pool is the one the
    Dockerfile's worker serves, and its schedules are cron strings Prefect accepts."""
    import importlib
    import inspect

    from prefect.client.schemas.schedules import CronSchedule

    spec = _load("prefect.yaml")
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"demo", "compare", "nightly-retrain"} <= set(deployments)
    for name, d in deployments.items():
        module, attr = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module), attr)
        assert flow.name == "full-pipeline", name
        params = d.get("parameters", {})
        assert set(params) <= set(inspect.signature(flow.fn).parameters), name
        flow.validate_parameters(params)  # pydantic validation against the signature
        for config in params.get("config", []):
            assert (REPO / config).is_file(), f"{name}: {config} is not in the repo"
        assert d["work_pool"]["name"] == WORK_POOL, name
        for schedule in d.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert deployments["nightly-retrain"]["parameters"]["retrain"] is True
    compare = load_config([REPO / c for c in deployments["compare"]["parameters"]["config"]])
    assert {"sit:ar_sit", "cq:maskgit", "cart:cart", "kl:far", "vit_vq:ar_sit", "vqgan:maskgit", "kl:mar"} == {
        name for name, _ in compare.pair_configs()}
    assert [s["cron"] for s in deployments["nightly-retrain"]["schedules"]] == ["0 2 * * *"]


# ------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _stages() -> list[dict]:
    """Stages in order: name, base image, args (ARG defaults, global ones included) and instructions."""
    global_args, stages = {}, []
    for instr, args in _dockerfile():
        if instr == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            stages.append({"name": name, "image": image, "args": dict(global_args), "instructions": []})
        elif instr == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key] = default.strip('"')
        else:
            stage = stages[-1]
            if instr == "ARG":
                key, _, default = args.partition("=")
                if default:
                    stage["args"][key] = default.strip('"')
            stage["instructions"].append((instr, args))
    return stages


def _all_args() -> dict[str, str]:
    merged = {}
    for stage in _stages():
        merged.update(stage["args"])
    return merged


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _copies() -> list[tuple[list[str], str, str | None]]:
    """``(sources, destination, --from stage or None)`` of every COPY/ADD."""
    out = []
    for stage in _stages():
        for instr, args in stage["instructions"]:
            if instr in ("COPY", "ADD"):
                words = _exec_form(args)
                flags = {w.split("=", 1)[0]: w.split("=", 1)[1] for w in words if w.startswith("--") and "=" in w}
                paths = [w for w in words if not w.startswith("--")]
                out.append((paths[:-1], paths[-1], flags.get("--from")))
    return out


def test_dockerfile_copies_only_existing_repo_files_and_the_whole_package():
    copied = set()
    for sources, _dest, from_stage in _copies():
        if from_stage is not None:
            assert from_stage in {s["name"] for s in _stages()}, f"COPY --from={from_stage}: no such stage"
            continue
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
            copied.add(src.rstrip("/"))
    # Everything `pip install .` needs: build files, the readme pyproject names, and every folder that
    # setup.py maps into the coarse2fine package (a folder left out would vanish from the image).
    needed = {"pyproject.toml", "setup.py", _pyproject()["project"]["readme"]} | _package_folders()
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_dockerfile_commands_are_installed_tools():
    known = _console_scripts() | {"prefect", "ray", "mlflow"}
    copied_dirs = [dest for _src, dest, from_stage in _copies() if from_stage is not None]
    commands = [
        _exec_form(args)
        for stage in _stages()
        for instr, args in stage["instructions"]
        if instr in ("CMD", "ENTRYPOINT")
    ]
    assert commands
    for argv in commands:
        exe = argv[0]
        if exe.startswith("/"):
            assert any(exe.startswith(d.rstrip("/") + "/") for d in copied_dirs), f"{exe} is not put into the image"
        else:
            assert exe in known, f"{exe} is neither a c2f console script nor a known tool"
            assert (BIN / exe).is_file(), f"{exe} is not installed next to {sys.executable}"


def test_dockerfile_default_target_is_the_prefect_worker():
    stages = _stages()
    final = stages[-1]
    cmd = [_exec_form(a) for i, a in final["instructions"] if i == "CMD"]
    assert cmd == [["prefect", "worker", "start", "--pool", WORK_POOL]]
    base = next(s for s in stages if s["image"].startswith("python:"))
    assert base["image"] == "python:3.11-slim"
    env = " ".join(a for i, a in base["instructions"] if i == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env
    helptext = subprocess.run([str(BIN / "prefect"), "worker", "start", "--help"], capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false"))
    assert helptext.returncode == 0, helptext.stderr
    assert "--pool" in helptext.stdout


def test_dockerfile_pins_match_the_package_requirements():
    args = _all_args()
    python = _pyproject()["project"]["requires-python"]
    assert Requirement(f"python{python}").specifier.contains(args["PYTHON_VERSION"] + ".0")
    assert _requirement("ray").specifier.contains(args["RAY_VERSION"])
    assert _requirement("apache-beam").specifier.contains(args["BEAM_VERSION"])
    torch_pin = Requirement(args["TORCH_SPEC"])
    assert torch_pin.name == "torch"
    pinned = [s.version for s in torch_pin.specifier if s.operator == "=="]
    assert pinned and _requirement("torch").specifier.contains(pinned[0])
    # The Beam SDK stage's Python is the image's Python (Dataflow needs them equal).
    beam = next(s for s in _stages() if s["image"].startswith("apache/beam_python"))
    assert beam["image"] == f"apache/beam_python{args['PYTHON_VERSION']}_sdk:{args['BEAM_VERSION']}"


def test_dockerfile_workdir_has_the_configs_and_no_package_sources():
    """The RayJob/`ray attach` run `c2f --config configs/…` in the WORKDIR; Ray puts the driver's working
    directory on the workers' sys.path, so no top-level package folder may sit there."""
    base = next(s for s in _stages() if s["image"].startswith("python:"))
    workdir, contents = None, {}
    for instr, args in base["instructions"]:
        if instr == "WORKDIR":
            workdir = args
        elif instr == "COPY" and workdir is not None:
            words = [w for w in _exec_form(args) if not w.startswith("--")]
            for src in words[:-1]:
                contents[src.rstrip("/")] = words[-1]
    assert workdir == "/app"
    assert "configs" in contents
    packages = _package_folders()
    assert not packages & set(contents), f"package sources in the working directory: {packages & set(contents)}"


# ------------------------------------------------------------------ Ray cluster launcher


def test_ray_cluster_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load("ray/cluster-gcp.yaml")
    validate_config(prepare_config(cfg))  # what `ray up` runs first
    assert cfg["provider"]["type"] == "gcp"
    for key in ("region", "availability_zone", "project_id"):
        assert cfg["provider"].get(key), key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert "GPU" not in types[cfg["head_node_type"]].get("resources", {})
    gpu_workers = {k: v for k, v in types.items() if k != cfg["head_node_type"] and v["resources"].get("GPU")}
    assert gpu_workers, "no GPU worker node type"
    for name, node in gpu_workers.items():
        nc = node["node_config"]
        accelerators = nc.get("guestAccelerators") or []
        assert accelerators, f"{name}: GPU resources but no guestAccelerators"
        assert sum(a["acceleratorCount"] for a in accelerators) == node["resources"]["GPU"]
        scheduling = {k: v for item in nc.get("scheduling", []) for k, v in item.items()}
        assert scheduling.get("onHostMaintenance") == "TERMINATE", f"{name}: GPU VMs must not live-migrate"
    assert cfg["docker"]["image"].rsplit(":", 1)[0] == IMAGE_REPO


# ------------------------------------------------------------------ KubeRay RayJob


def _rayjob() -> dict:
    return _load("ray/rayjob.yaml")


def _entrypoint() -> tuple[list[str], object]:
    """argv of the RayJob entrypoint and the click context of its c2f subcommand (flags parsed)."""
    import typer

    from coarse2fine.pipelines.cli import app

    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    group = typer.main.get_command(app)
    assert argv[0] == "c2f" and "c2f" in _console_scripts()
    assert argv[1] in group.commands, f"c2f has no subcommand {argv[1]!r}"
    ctx = group.commands[argv[1]].make_context(argv[1], argv[2:])  # raises on an unknown flag
    return argv, ctx


def test_rayjob_shape():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == _all_args()["RAY_VERSION"]
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    ]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {_load("ray/cluster-gcp.yaml")["docker"]["image"]}
    assert all(c.get("workingDir") == "/app" for p in pods for c in p["spec"]["containers"])


def test_rayjob_entrypoint_is_a_valid_c2f_command():
    argv, ctx = _entrypoint()
    configs = [Path(p) for p in ctx.params["config"] or []]
    assert configs, "the entrypoint names no --config"
    for p in configs:
        assert not p.is_absolute() and (REPO / p).is_file(), f"--config {p} is not in the repository"
    overrides = ctx.params["set_"] or []
    cfg = load_config([REPO / p for p in configs], overrides)  # every --set validates

    # A cluster job: Ray joined (not started), shared storage and a tracking server.
    assert cfg.ray.address is not None
    assert cfg.ray.num_cpus is None, "ray.init refuses num_cpus when joining a cluster: add --set ray.num_cpus=null"
    assert cfg.storage.root.startswith("gs://") and cfg.data.source.startswith("gs://")
    assert cfg.tracking.uri.startswith("http")
    assert cfg.tokenizer.train.use_gpu

    # Enough GPUs for the Ray Train workers (one each).
    groups = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            limit = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
            gpus += g["replicas"] * limit
    assert gpus >= cfg.tokenizer.train.num_workers


def test_rayjob_entrypoint_rejects_a_bad_override():
    """The check above has teeth: a misspelled key fails load_config."""
    from coarse2fine.pipelines.config import ConfigError

    _argv, ctx = _entrypoint()
    with pytest.raises(ConfigError):
        load_config([REPO / p for p in ctx.params["config"]], [*ctx.params["set_"], "train.num_worker=2"])


# ------------------------------------------------------------------ Beam overlays


@pytest.mark.parametrize("rel, runner", [("beam/dataflow.yaml", "DataflowRunner"), ("beam/flink.yaml", "FlinkRunner")])
def test_beam_overlay(rel: str, runner: str):
    from apache_beam.options.pipeline_options import PipelineOptions

    overlay = _load(rel)
    assert set(overlay) <= {"preprocess", "storage", "data"}
    cfg = load_config([DEMO, INFRA / rel])
    base = load_config(DEMO)
    assert cfg.preprocess.runner == runner
    assert cfg.preprocess.decomposition == base.preprocess.decomposition  # an overlay, not a replacement
    opts = cfg.preprocess.runner_options
    assert opts and all(o.startswith("--") for o in opts)
    try:
        options = PipelineOptions(opts)
        unknown = options.get_all_options(retain_unknown_options=True).keys() - options.get_all_options().keys()
    except SystemExit:  # argparse rejected a value (e.g. a --flink_version Beam does not publish)
        pytest.fail(f"Beam rejects the runner_options of {rel}")
    assert not unknown, f"flags unknown to Beam: {sorted(unknown)}"
    values = dict(o[2:].split("=", 1) for o in opts if "=" in o)
    if "setup_file" in values:
        assert (REPO / values["setup_file"]).is_file()
    if runner == "DataflowRunner":
        assert "setup_file" in values, "Dataflow workers need the package (--setup_file)"
        for key in ("project", "region", "temp_location"):
            assert key in values, key
        assert values["temp_location"].startswith("gs://")
        assert cfg.storage.root.startswith("gs://") and cfg.data.source.startswith("gs://")
    else:
        assert "flink_master" in values


# ------------------------------------------------------------------ MLflow server


def _run_server_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run server.sh with a stub ``mlflow`` first on PATH; return the result and the argv it got."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    record = tmp_path / "argv.json"
    stub = stub_dir / "mlflow"
    stub.write_text(f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, "w"))\n')
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    clean.update(env, PATH=f"{stub_dir}{os.pathsep}{clean.get('PATH', '')}")
    res = subprocess.run(["bash", str(INFRA / "mlflow/server.sh")], env=clean, capture_output=True, text=True,
                         timeout=30)
    return res, json.loads(record.read_text()) if record.exists() else None


def test_mlflow_server_script(tmp_path: Path):
    script = INFRA / "mlflow/server.sh"
    assert script.stat().st_mode & stat.S_IXUSR, "server.sh is not executable"
    assert "set -euo pipefail" in script.read_text()
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr

    res, argv = _run_server_script(tmp_path, MLFLOW_ARTIFACTS_DESTINATION="gs://bucket/mlflow")
    assert res.returncode == 0, res.stderr
    assert argv is not None and argv[0] == "server"
    helptext = subprocess.run([str(BIN / "mlflow"), "server", "--help"], capture_output=True, text=True, timeout=60)
    assert helptext.returncode == 0, helptext.stderr
    flags = [a for a in argv[1:] if a.startswith("--")]
    for flag in flags:
        assert re.search(rf"(^|[\s/,]){re.escape(flag)}\b", helptext.stdout), f"mlflow server has no {flag}"
    value = {f: argv[i + 2] for i, f in enumerate(argv[1:]) if f.startswith("--") and i + 2 < len(argv)
             and not argv[i + 2].startswith("--")}
    assert "--serve-artifacts" in flags
    assert value["--artifacts-destination"] == "gs://bucket/mlflow"
    assert value["--backend-store-uri"].startswith("postgresql://")
    assert value["--host"] == "0.0.0.0" and value["--port"] == "5000"

    # The Kubernetes Service name used by the RayJob's tracking.uri passes MLflow's Host check.
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = value["--allowed-hosts"].split(",")
    assert is_allowed_host_header(hosts, "mlflow:5000")
    assert is_allowed_host_header(hosts, "localhost:5000")
    assert not is_allowed_host_header(hosts, "attacker.example.com")


def test_mlflow_server_script_needs_an_artifact_destination(tmp_path: Path):
    res, argv = _run_server_script(tmp_path)
    assert res.returncode != 0 and argv is None
    assert "MLFLOW_ARTIFACTS_DESTINATION" in res.stderr
