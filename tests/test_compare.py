"""recipe.compare's plumbing: configs (default three or CONFIGS=...), names, ds_configs, a free master port per
launch, the launch command; one real 2-config comparison (multirank)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

import recipe.compare as compare
from conftest import ROOT, run_to_end, write_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DENSE = dict(num_experts=1, moe_gate_k=1)


def test_default_contenders_are_the_three_with_their_names_and_ds_configs():
    runs = compare.contenders(list(compare.DEFAULT_CONFIGS.values()), [])
    assert [(c.name, c.ds_config, c.is_moe) for c in runs] == [
        ("moe", compare.MOE_DS_CONFIG, True), ("finegrained", compare.MOE_DS_CONFIG, True),
        ("dense", compare.DENSE_DS_CONFIG, False)]
    assert compare.parse_args([]).configs == list(compare.DEFAULT_CONFIGS.values())


def test_given_configs_are_named_by_file_and_get_a_ds_config_by_kind(tmp_path):
    moe = write_config(tmp_path / "a.py", tmp_path / "data")
    dense = write_config(tmp_path / "b.py", tmp_path / "data", model_type="INTERNLM", model=DENSE)
    (tmp_path / "other").mkdir()
    again = write_config(tmp_path / "other" / "a.py", tmp_path / "data")  # the same file name again
    args = compare.parse_args(["--configs", str(moe), str(dense), str(again)])
    runs = compare.contenders(args.configs, args.set)
    assert [(c.name, c.ds_config, c.is_moe) for c in runs] == [
        ("a", compare.MOE_DS_CONFIG, True), ("b", compare.DENSE_DS_CONFIG, False), ("a-2", compare.MOE_DS_CONFIG, True)]
    assert {c.ds_config for c in compare.contenders(args.configs, [], "my.json")} == {"my.json"}


def test_free_port_is_free_and_the_launch_command_uses_it(tmp_path):
    port = compare.free_port()
    with socket.socket() as listener:  # nothing holds it: a master can listen there
        listener.bind(("", port))
        listener.listen()
    contender = compare.Contender("a", "a.py", "ds.json", True)
    cmd = compare.launch_command(contender, tmp_path / "a", 2, port, ["train.steps=2"])
    assert cmd[:2] == ["bash", str(ROOT / "launch" / "train.sh")]
    flags = dict(zip(cmd[2:cmd.index("--")][::2], cmd[2:cmd.index("--")][1::2]))
    assert flags == {"--nproc": "2", "--config": "a.py", "--ds_config": "ds.json", "--run_dir": str(tmp_path / "a"),
                     "--master_port": str(port), "--python": sys.executable}
    assert cmd[cmd.index("--") + 1:] == ["--set", "train.steps=2"]


def _fake_training(commands: list[list[str]]):
    """subprocess.run for main: records the command and writes the run folder a 2-step training would."""
    def run(cmd, cwd=None, env=None):
        commands.append(cmd)
        run_dir = compare.Path(cmd[cmd.index("--run_dir") + 1])
        run_dir.mkdir(parents=True)
        loss = 5.0 - 0.1 * len(commands)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "lm_loss": loss}) + "\n"
                                               + json.dumps({"step": 2, "val_loss": loss}) + "\n")
        summary = dict(val_loss=loss, tokens_seen=512, active_params=1e5, total_params=2e5, tokens_per_s=1e3,
                       wall_s=1.0)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_main_trains_the_given_configs_each_on_its_own_free_port(tmp_path, monkeypatch, capsys):
    moe = write_config(tmp_path / "moe_cfg.py", tmp_path / "data")
    dense = write_config(tmp_path / "dense_cfg.py", tmp_path / "data", model_type="INTERNLM", model=DENSE)
    commands: list[list[str]] = []
    monkeypatch.setattr(compare.subprocess, "run", _fake_training(commands))
    picked = iter([40001, 40002])  # a fresh pick per launch
    monkeypatch.setattr(compare, "free_port", lambda: next(picked))
    out = tmp_path / "out"
    assert compare.main(["--configs", str(moe), str(dense), "--out", str(out), "--set", "train.steps=2"]) == 0
    assert [cmd[cmd.index("--master_port") + 1] for cmd in commands] == ["40001", "40002"]
    assert [cmd[cmd.index("--config") + 1] for cmd in commands] == [str(moe), str(dense)]
    assert all(cmd[-2:] == ["--set", "train.steps=2"] for cmd in commands)
    assert set(json.loads((out / "compare.json").read_text())) == {"moe_cfg", "dense_cfg"}
    assert (out / "moe_vs_dense.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "moe_cfg minus dense_cfg validation loss: +0.1000 nats (dense_cfg better)" in capsys.readouterr().out


def test_unknown_only_names_and_bad_configs_are_one_line(tmp_path, capsys):
    assert compare.main(["--only", "nope", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: --only nope: no such contender; choose from moe finegrained dense\n"
    assert compare.main(["--configs", str(tmp_path / "missing.py"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_make_compare_passes_configs():
    # --no-print-directory: under `make test` this make is a sub-make, which would end with "Leaving directory".
    dry_run = ["make", "-n", "--no-print-directory", "compare"]
    line = subprocess.run([*dry_run, "CONFIGS=a.py b.py"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    assert line.endswith("-m recipe.compare --nproc 2 --configs a.py b.py"), line
    line = subprocess.run(dry_run, cwd=ROOT, capture_output=True, text=True).stdout.splitlines()[-1]
    assert line.rstrip().endswith("-m recipe.compare --nproc 2"), line


@pytest.mark.multirank
def test_a_real_comparison_of_two_tiny_configs(tiny_data, tmp_path):
    """Two tiny configs through launch/train.sh (2 steps each), one with a free port per launch."""
    moe = write_config(tmp_path / "tiny_a.py", tiny_data, train=dict(steps=2, eval_every=2))
    dense = write_config(tmp_path / "tiny_b.py", tiny_data, model_type="INTERNLM", model=DENSE,
                         train=dict(steps=2, eval_every=2))
    out = tmp_path / "out"
    proc = run_to_end([sys.executable, "-m", "recipe.compare", "--configs", str(moe), str(dense), "--out", str(out)],
                      cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert set(result) == {"tiny_a", "tiny_b"} and result["tiny_a"]["tokens_seen"] == result["tiny_b"]["tokens_seen"]
    assert "tiny_a minus tiny_b validation loss" in proc.stdout
