"""The README's commands run as written: every line of its ```bash blocks is either run here, in order, in a
scratch copy of the project (training with a few steps instead of hundreds), or listed in NOT_RUN with the
reason and the test that covers it instead. A README example that breaks, or a new one nobody classified,
fails this file."""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import ROOT, _free_port, run_to_end

README = ROOT / "README.md"

# Commands not run here, with why. Matched against the command with its trailing comment removed.
NOT_RUN = {
    "make train": "the default run end to end (5-10 min): the `launch/train.sh` line of 'Launching' runs the same "
                  "launch, after the `recipe.data.prepare --default` that `make data` runs",
    "make test": "this suite",
    "launch/train.sh --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --nproc 8": "another machine; "
        "test_training.py::test_two_nodes_on_loopback runs these flags with 127.0.0.1",
    "launch/train.sh --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --nproc 8": "as above",
    "python -m recipe.data.prepare --source my_corpus/ --out data/mine --tokenizer /models/Qwen3-30B-A3B":
        "a published model folder; test_hf_tokenizer.py prepares with a tiny Hugging Face tokenizer",
    "launch/train.sh --nproc 8 --config my_qwen3.py --ds_config my_zero1_bf16_ep8.json": "a published model; "
        "test_hf_training.py trains tiny save_pretrained folders at EP 1/2/4",
}

# Few steps for every training command; a resumed run gets two more than its checkpoint holds, stretching the
# LR schedule on purpose (the README's runs are shortened here, so their schedules are too).
TINY_TRAIN = ["--set", "train.log_every=1", "--set", "train.eval_batches=1", "--set", "train.wandb=disabled"]
FRESH_STEPS = 2


def readme_commands(text: str) -> list[str]:
    """Every command line of the ```bash blocks (indented ones too), without its trailing comment."""
    commands, in_block = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = stripped == "```bash" if not in_block else False
            continue
        if in_block:
            command = re.sub(r"\s+#.*$", "", stripped) if not stripped.startswith("#") else ""
            if command:
                commands.append(" ".join(command.split()))
    return commands


def test_every_readme_command_is_run_or_excused():
    """Fast: the list the multi-rank test runs is the README's, and NOT_RUN names no command the README lost."""
    commands = readme_commands(README.read_text())
    assert commands, "no ```bash block found in README.md"
    stale = sorted(set(NOT_RUN) - set(commands))
    assert not stale, f"NOT_RUN lists commands the README no longer has: {stale}"
    for command in commands:
        assert command in NOT_RUN or runnable(command), f"README command neither run nor excused: {command}"


def test_readme_parser_sees_indented_blocks_and_drops_comments():
    text = "x\n```bash\nmake a   # why\n# only a comment\n```\n1. step\n   ```bash\n   python -m b  --c\n   ```\n"
    assert readme_commands(text) == ["make a", "python -m b --c"]


def runnable(command: str) -> bool:
    return command.startswith(("launch/train.sh", "python -m recipe."))


def _workspace(root: Path) -> Path:
    """A scratch project: the code and JSONs linked in, its own data/, runs/ and outputs."""
    for name in ("recipe", "launch", "ds_configs"):
        (root / name).symlink_to(ROOT / name)
    (root / ".venv").symlink_to(Path(sys.prefix))  # launch/train.sh picks .venv/bin/python, as after make install
    return root


def _expand(command: str, workspace: Path) -> list[str]:
    """The argv run for a README line: python is this interpreter; training gets few steps."""
    argv = shlex.split(command)
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] != "launch/train.sh" or "--help" in argv:
        return argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[:argv.index("--")] if "--" in argv else argv
    steps = FRESH_STEPS
    if "--resume" in extra:
        from recipe.checkpoint import latest_tag

        run_dir = workspace / head[head.index("--run_dir") + 1]
        steps = int(latest_tag(run_dir).removeprefix("step")) + 2
        extra += ["--set", "train.lr_schedule_on_resume=stretch"]
    return [*head, "--", *extra, *TINY_TRAIN, "--set", f"train.steps={steps}"]


@pytest.mark.multirank
def test_readme_commands_run_as_written(tmp_path):
    workspace = _workspace(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prepared = run_to_end([sys.executable, "-m", "recipe.data.prepare", "--default"], cwd=workspace, env=env)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    for command in readme_commands(README.read_text()):
        if command in NOT_RUN:
            continue
        argv = _expand(command, workspace)
        proc = run_to_end(argv, cwd=workspace, env={**env, "MASTER_PORT": str(_free_port())})
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if "--out" in argv:
            assert (workspace / argv[argv.index("--out") + 1]).exists(), command
    _check_exports(workspace)
    # Negative control: the reshard example as the README once had it (4 ranks at 8 sequences each, from a
    # 2-rank run of 16 per step) is refused, and this harness sees it.
    broken = _expand("launch/train.sh --nproc 4 --ds_config ds_configs/zero1_bf16_ep2.json --run_dir runs/my_run "
                     "-- --resume --reshard", workspace)
    proc = run_to_end(broken, cwd=workspace, env={**env, "MASTER_PORT": str(_free_port())})
    assert proc.returncode != 0 and "global micro-batch" in proc.stdout + proc.stderr


def _check_exports(workspace: Path) -> None:
    """What the README's export lines promise: the HF folder's AutoTokenizer encodes as the run's tokenizer, and
    the zero_to_fp32.py a DeepSpeed user runs in checkpoints/ (DeepSpeed's, replaced at commit) names the export."""
    import subprocess

    import transformers

    from recipe.data.tokenizer import load_tokenizer

    run = workspace / "runs" / "my_run"
    proc = subprocess.run([sys.executable, "checkpoints/zero_to_fp32.py", "checkpoints", "out.pt"], cwd=run,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"python -m recipe.export --run_dir {run} --format torch --out out.pt" in proc.stderr
    ours = load_tokenizer(run)
    theirs = transformers.AutoTokenizer.from_pretrained(workspace / "moe_hf")
    for text in ("  Two leading spaces, repeated   ones,\ttabs\nand 123 digits \u2603.", "The nation."):
        assert theirs(text)["input_ids"] == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))
