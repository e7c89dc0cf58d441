"""Config validation and the c2f command line: clear one-line errors, help, inspect rendering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from coarse2fine.pipelines.cli import main
from coarse2fine.pipelines.config import ConfigError, load_config, table_variants

REPO = Path(__file__).resolve().parents[1]
C2F = str(Path(sys.executable).with_name("c2f"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.data.resolution % (2**cfg.preprocess.levels) == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("preprocess.levelz=3", "preprocess.levelz: unknown key"),
        ("data.resolution=abc", "data.resolution"),
        ("data.resolution=63", "even"),
        ("preprocess.levels=7", "not divisible"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_overrides_raise_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/demo.yaml", [override])


@pytest.mark.parametrize("path", sorted((REPO / "configs/overlays").glob("*.yaml")), ids=lambda p: p.name)
def test_every_overlay_validates_on_the_demo_config(path):
    cfg = load_config([REPO / "configs/demo.yaml", path])
    assert len(cfg.pair_configs()) >= 1


def test_pairs_take_their_methods_and_overrides_and_nothing_else():
    cfg = load_config(REPO / "configs/tiny.yaml", [
        'pairs=[sit:ar_sit, {pair: "cq:maskgit", overrides: {tokenizer.train.max_steps: 3, generator.maskgit.size: mini}}]'])
    (n1, sit), (n2, cq) = cfg.pair_configs()
    assert (n1, sit.tokenizer.method, sit.generator.method, sit.tokenizer.train.max_steps) == ("sit:ar_sit", "sit", "ar_sit", 6)
    assert (n2, cq.tokenizer.method, cq.generator.method) == ("cq:maskgit", "cq", "maskgit")
    assert cq.tokenizer.train.max_steps == 3 and cq.generator.maskgit.size == "mini" and cq.data == cfg.data
    assert not sit.pairs and not cq.pairs
    plain = load_config(REPO / "configs/tiny.yaml", ["pairs=[]"])
    assert [n for n, _ in plain.pair_configs()] == [f"{plain.tokenizer.method}:{plain.generator.method}"]


@pytest.mark.parametrize("pairs, message", [
    ("[sit:nope]", "'sit:nope' is not tokenizer:generator with tokenizer one of sit, "),
    ("[sit]", "'sit' is not tokenizer:generator"),
    ("[sit:ar_sit, sit:ar_sit]", "each pair once"),
    ('[{pair: "sit:ar_sit", overrides: {data.resolution: 16}}]', "not data.resolution"),
    ('[{pair: "sit:ar_sit", overrides: {generator.guidance: 3}}]', "(not their methods or sampling settings), not generator.guidance"),
    ('[{pair: "sit:ar_sit", overrides: {tokenizer.method: cq}}]', "not tokenizer.method"),
    ('[{pair: "sit:ar_sit", overrides: {evaluate.max_samples: 4}}]', "not evaluate.max_samples"),
    ('[{pair: "sit:ar_sit", overrides: {tokenizer.sit.bogus: 1}}]', "pair sit:ar_sit: tokenizer.sit.bogus: unknown key"),
])
def test_bad_pairs_are_one_line_errors(pairs, message):
    """Syntax, methods and override sections when the config loads; each pair's own config when
    the pairs are run (`pair_configs`, which the flow and `c2f run` call first)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs/tiny.yaml", [f"pairs={pairs}"]).pair_configs()


def test_a_pair_invalid_at_another_resolution_does_not_block_single_stages():
    cfg = load_config(REPO / "configs/demo.yaml", ["data.resolution=32", "preprocess.levels=2"])
    with pytest.raises(ConfigError, match="pair cart:cart: .*the last base scale must be the latent side 4"):
        cfg.pair_configs()
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--set", "data.resolution=32",
                 "--set", "preprocess.levels=2"]) == 2  # before Prefect starts


def test_run_refuses_a_method_override_the_pairs_would_ignore(capsys):
    """demo.yaml lists pairs: `--set tokenizer.method=cq` alone would silently run the four pairs."""
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--set", "tokenizer.method=cq"]) == 2
    err = capsys.readouterr().err
    assert "error: the config lists pairs" in err and "for one pair: --set 'pairs=[TOKENIZER:GENERATOR]'\n" in err  # one line


def test_override_sets_nested_value():
    cfg = load_config(REPO / "configs/demo.yaml", ["preprocess.decomposition.alpha=5", "storage.root=gs://b/p"])
    assert cfg.preprocess.decomposition.alpha == 5.0 and cfg.storage.root == "gs://b/p"


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["preprocess", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["preprocess", "--config", str(REPO / "configs/demo.yaml"), "--set", "data.resolution=x"]) == 2
    assert main(["preprocess", "--config", str(REPO / "configs/demo.yaml"), "--set", f"data.source={tmp_path}/nope"]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "config file not found" in err and "data.resolution" in err
    assert "data.source does not exist" in err and "incomplete" in err


def test_usage_errors_are_one_line_exit_2_and_version_prints(tmp_path, capsys):
    """Typos, missing options and missing files are usage errors (exit 2, no traceback) whichever
    click typer uses; --version prints the package version."""
    assert main(["generat"]) == 2
    assert main(["generate"]) == 2  # --run is required
    assert main(["upsample", "--run", "x", "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No such command 'generat'" in err and "--run" in err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("coarse2fine ")


def test_training_progress_line():
    from coarse2fine.train.launch import progress_line

    p = {"step": 120, "total": 1000, "loss": 0.03121, "images_per_s": 14.25}
    assert progress_line("tokenizer sit", p) == "tokenizer sit: step 120/1000 · loss 0.03121 · 14.2 img/s"
    assert progress_line("x", p | {"seconds_per_step": 0.5}).endswith("· ETA 7m20s")  # 880 steps × 0.5 s


def test_a_programming_error_is_not_reported_as_a_user_error(monkeypatch, capsys):
    """A bug (a plain ValueError deep in a stage) keeps its traceback; a user error is one line."""
    from coarse2fine.pipelines import stages
    from coarse2fine.preprocess.errors import UserKeyError

    def buggy(cfg):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(stages, "preprocess", buggy)
    with pytest.raises(ValueError, match="internal invariant broken"):
        main(["preprocess", "--config", str(REPO / "configs/demo.yaml")])

    def missing(cfg):
        raise UserKeyError("no MLflow run abc")

    monkeypatch.setattr(stages, "preprocess", missing)
    assert main(["preprocess", "--config", str(REPO / "configs/demo.yaml")]) == 2
    assert capsys.readouterr().err.strip().endswith("no MLflow run abc")  # not quoted as a KeyError would be


def test_help_explains_every_command():
    out = subprocess.run([C2F, "--help"], capture_output=True, text=True, check=True).stdout
    commands = set(re.findall(r"^│ (\S+)\s", out, re.M))  # rich's command table: "│ name   help…"
    assert {"run", "deploy", "demo-data", "preprocess", "inspect", "train-tokenizer", "tokenize", "train-generator",
            "methods",
            "evaluate", "generate", "refine", "upsample", "edit", "fid", "compare"} <= commands, commands
    sub = subprocess.run([C2F, "preprocess", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--config" in sub and "--set" in sub


@pytest.mark.slow
def test_demo_data_preprocess_inspect_end_to_end(tmp_path, capsys):
    src, root = tmp_path / "imgs", tmp_path / "store"
    assert main(["demo-data", "--out", str(src), "--n", "6", "--resolution", "32", "--seed", "3"]) == 0
    assert len(list(src.rglob("*.png"))) == 6
    sets = ["--set", f"data.source={src}", "--set", f"storage.root={root}", "--set", "data.resolution=32",
            "--set", "preprocess.levels=2", "--set", "preprocess.num_workers=1",
            "--set", "preprocess.decomposition.max_outer=3"]
    assert main(["preprocess", "--config", str(REPO / "configs/demo.yaml"), *sets]) == 0
    out = capsys.readouterr().out
    assert "inputs=6" in out
    (dec,) = (root / "decomposition").iterdir()
    assert main(["inspect", str(dec)]) == 0
    out = capsys.readouterr().out
    assert "rows: " in out and "fingerprint" in out and "first keys:" in out
    key = out.split("first keys: ")[1].split(",")[0].strip()
    png = tmp_path / "row.png"
    assert main(["inspect", str(dec), "--key", key, "--png", str(png)]) == 0
    w, h = Image.open(png).size
    assert w > 300 and h > 300
    assert main(["inspect", str(dec), "--key", "zzzz", "--png", str(png)]) == 2
    # as its own process (how users run it): a clean exit every time, not an abort at interpreter exit
    c2f = str(Path(sys.executable).with_name("c2f"))
    for _ in range(3):
        done = subprocess.run([c2f, "inspect", str(dec), "--key", key, "--png", str(png)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]


def test_sit_table5_rows_build_the_variants_they_name():
    """Seed Table 5: eleven distinct SITs; each row's switches are what its name says."""
    from coarse2fine.train import methods

    sit = methods.tokenizer("sit")
    count = {}
    for name, overrides in table_variants(REPO / "configs/tables/sit_table5.yaml").items():
        cfg = load_config(REPO / "configs/demo.yaml", overrides).tokenizer.model_config_for(64)
        model = sit.build(cfg)
        assert cfg.num_scales == (5 if name == "5 scales" else 4)
        assert sit.describe(cfg) == "SIT" + {(True, True): "-SC", (True, False): "-SCE", (False, True): "-SCD",
                                             (False, False): ""}[("SC encoder" in name or "SC both" in name,
                                                                   "SC decoder" in name or "SC both" in name)]
        assert (cfg.entropy_weight == 0) == ("no entropy" in name)
        assert cfg.per_scale_codebooks == ("one codebook" not in name)
        assert cfg.enc_per_scale_params == ("shared encoder" not in name and "shared both" not in name)
        assert cfg.dec_per_scale_params == ("shared decoder" not in name and "shared both" not in name)
        assert (cfg.dec_size is not None) == ("larger decoder" in name)
        count[name] = sum(p.numel() for p in model.parameters())
    assert len(count) == 11
    sc = "4 scales, SC both"
    assert count[f"{sc}, shared both"] < count[f"{sc}, shared encoder"] == count[f"{sc}, shared decoder"] < count[sc]
    assert count[f"{sc}, one codebook"] < count[sc] == count["4 scales"] < count["5 scales"]
    assert count["4 scales, larger decoder"] > count["4 scales"]


@pytest.mark.parametrize("overlay, name, caps", [
    ("sit-sce.yaml", "SIT-SCE", {"encode_prefix"}), ("sit-scd.yaml", "SIT-SCD", {"decode_prefix"}),
    ("sit-dense.yaml", "SIT", set())])
def test_sit_variant_overlays_are_the_seeds_configurations(overlay, name, caps):
    from coarse2fine.train import methods

    sit = methods.tokenizer("sit")
    cfg = load_config([REPO / "configs/demo.yaml", REPO / "configs/overlays" / overlay]).tokenizer.model_config_for(64)
    assert sit.describe(cfg) == name and sit.capabilities(cfg) == caps
    if name != "SIT":  # SCE/SCD (seed §5.3): per-scale encoder, one decoder for all scales
        assert cfg.enc_per_scale_params and not cfg.dec_per_scale_params


def test_the_xla_path_runs_one_worker_and_refuses_the_torchscript_perceptual():
    """``train.device: xla`` (tests/test_xla.py runs it where torch_xla is installed): one worker,
    no use_gpu, and a perceptual distance XLA can run, each refused with a clear error up front."""
    from coarse2fine.preprocess.errors import UserValueError
    from coarse2fine.train.config import TokenizerConfig, TrainConfig
    from coarse2fine.train.launch import fit_tokenizer

    for bad in ({"num_workers": 2}, {"use_gpu": True}):
        with pytest.raises(ValueError, match="xla runs one worker"):
            TrainConfig(device="xla", **bad)
    cfg = TokenizerConfig(sit={"num_scales": 3, "tokens_per_scale": 4, "size": "tiny", "codebook_size": 64},
                          train=TrainConfig(device="xla", perceptual="inception"))
    with pytest.raises(UserValueError, match="TorchScript"):
        fit_tokenizer("memory://nothing", cfg, 32, "memory://checkpoints", "xla")
