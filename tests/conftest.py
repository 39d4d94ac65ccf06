"""Shared fixtures: a tiny prepared corpus, tiny configs, and a runner for the real deepspeed launcher."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the nation people congress year government states united world peace freedom law work economy "
         "future children families country tax health jobs security we our must will can new great strong").split()


# Safety net for waits on training processes (a launch's end, a first step, ranks exiting). Every wait is for
# a condition the test observes; this deadline only turns a hang into a failure. Generous on purpose: one
# launch takes 10-200 s on a 2-core machine shared with other work, a 3x slower machine under load several
# minutes: never 30.
SAFETY_S = 30 * 60


def run_to_end(cmd: list[str], timeout: float = SAFETY_S, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for commands that start a process tree (the
    launcher and its ranks): still running after ``timeout`` s (a hang), the whole tree is killed (not only
    its first process, whose children would keep running) and the test fails with the output so far."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a hang, or the run interrupted (Ctrl-C): end the whole tree
        _kill_group(proc)
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise AssertionError(f"{' '.join(map(str, cmd))[:300]}\nstill running after {timeout:.0f} s, killed:\n"
                                 f"{out[-4000:]}\n{err[-4000:]}") from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group that ``proc`` (started with start_new_session=True) leads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has ended already
        pass
    proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_shm_segments():
    """Ranks killed on purpose (crash, rank-death and guard tests) before the trainer unlinked DeepSpeed's shm
    allreduce segments leave them in /dev/shm, ~66 MB of RAM each; remove this session's at the end."""
    started = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if path.stat().st_mtime >= started - 1:
                path.unlink()
        except FileNotFoundError:
            pass


def prepare_tiny_corpus(root: Path) -> Path:
    """``root/prepared``: tokenizer (vocab 320) and uint16 shards of 40 synthetic documents written to
    ``root/docs``; the same bytes every time (tests/fixtures/make_old_checkpoint.py relies on it too)."""
    from recipe.data.prepare import prepare_dataset

    source = root / "docs"
    source.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(30)]
        (source / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    out = root / "prepared"
    prepare_dataset(source, out, vocab_size=320, val_every=5, seed=0, verbose=False)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder (tokenizer vocab 320, uint16 shards) from 40 synthetic documents."""
    return prepare_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


TINY_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=320, max_seq_len=32,
                  multiple_of=8, num_experts=4, moe_gate_k=2, moe_capacity_factor=1.25, moe_min_capacity=2)


def write_config(path: Path, data_dir: Path, model_type: str = "INTERNLM_MoE", model: dict | None = None,
                 train: dict | None = None, loss: dict | None = None) -> Path:
    model = {**TINY_MODEL, **(model or {})}
    train = {"steps": 3, "log_every": 1, "eval_every": 1000, "eval_batches": 2, "save_every": 1000, "wandb": "disabled",
             **(train or {})}
    loss = {"moe_loss_coeff": 0.01, **(loss or {})}
    path.write_text(
        f"model_type = {model_type!r}\nmodel = {model!r}\nloss = {loss!r}\n"
        f"data = {dict(path=str(data_dir), seq_len=16)!r}\ntrain = {train!r}\n"
    )
    return path


def write_ds_config(path: Path, base: str = "zero2_fp32.json", **changes) -> Path:
    """A copy of ds_configs/<base> with top-level keys replaced (``moe_recipe={"ep_size": 2}`` etc.)."""
    config = json.loads((ROOT / "ds_configs" / base).read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


def launch(nproc: int, config: Path, ds_config: Path, run_dir: Path, *extra: str, timeout: float = SAFETY_S,
           check: bool = True) -> subprocess.CompletedProcess:
    """Train through launch/train.sh (the deepspeed launcher) and return the finished process (``timeout``: a
    safety net, see SAFETY_S)."""
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--nproc", str(nproc), "--config", str(config),
           "--ds_config", str(ds_config), "--run_dir", str(run_dir), "--python", sys.executable, "--", *extra]
    try:
        proc = run_to_end(cmd, timeout=timeout, cwd=ROOT, env=env)
    finally:
        # DeepSpeed's CPU shm allreduce segments of this run (~66 MB per rank): the trainer unlinks them after
        # start-up; whatever a run that failed before that left behind is removed here so RAM does not fill up.
        leftover = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"))
        for path in leftover:
            path.unlink(missing_ok=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if check:
        assert not leftover, f"the trainer left DeepSpeed shm segments behind: {[p.name for p in leftover]}"
    return proc


def clipped_ds_json(path: Path, base: str, train_micro_batch_size_per_gpu: int = 2, **zero) -> Path:
    """ds_configs/<base> at a micro batch of 2, a constant rate (no scheduler: every step moves the weights) and a
    clip norm of 0.05 (the tiny models' norm is ~1: clipping scales every update); ``zero`` into its ZeRO block."""
    raw = json.loads((ROOT / "ds_configs" / base).read_text())
    raw.pop("scheduler")
    raw.update(train_micro_batch_size_per_gpu=train_micro_batch_size_per_gpu, gradient_clipping=0.05)
    raw["zero_optimization"].update(zero)
    path.write_text(json.dumps(raw))
    return path


def run_on_ranks(nproc: int, *target: str) -> None:
    """``target`` (a script and its arguments, or ``--module NAME ...``) on ``nproc`` ranks through DeepSpeed's
    runner; the script gets ``--local_rank=N`` first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "recipe.launcher", "runner", "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), "--num_gpus", str(nproc), *target]
    proc = run_to_end(cmd, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def copy_at_step(source: Path, run_dir: Path, step: int, last_step: int) -> Path:
    """A copy of run ``source`` whose only checkpoint is ``step`` (its metrics.jsonl kept: the resumed run
    replaces what follows)."""
    import shutil

    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step{last_step:08d}")
    (run_dir / "checkpoints" / "latest").write_text(f"step{step:08d}")
    return run_dir


def train_layouts(config: Path, layouts: dict[str, tuple[int, int, int]], tmp_path: Path) -> dict[str, list[dict]]:
    """Train ``config`` once per layout ``{name: (ranks, micro batch, ep_size)}`` (ds_config zero2_fp32.json with
    those changed), each in ``tmp_path / name``; returns each run's train records."""
    results = {}
    for name, (ranks, micro, ep) in layouts.items():
        ds = write_ds_config(tmp_path / f"{name}.json", train_micro_batch_size_per_gpu=micro,
                             moe_recipe={"ep_size": ep})
        launch(ranks, config, ds, tmp_path / name)
        results[name], _ = read_metrics(tmp_path / name)
    return results


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


# ---- a launch the test acts on while it runs (a signal, a killed rank) ----

@contextmanager
def background_launch(cmd: list[str], port: str, stdout_path: Path, stderr_path: Path | None = None,
                      env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (launch/train.sh) in its own session, output to files (not pipes: nobody reads a pipe while
    the test waits, and a full one would stall the ranks; stderr joins stdout unless ``stderr_path``). On leaving:
    the whole tree is killed if still running, and the shm segments of master port ``port`` are removed."""
    with open(stdout_path, "w") as out, open(stderr_path or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err if stderr_path else subprocess.STDOUT,
                                text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log_path: Path) -> None:
    """Poll until ``ready()``; the launch ending first fails the test, and so does SAFETY_S (a hang only)."""
    deadline = time.monotonic() + SAFETY_S
    while not ready():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {SAFETY_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def logged_steps(run_dir: Path) -> int:
    """Train records in ``run_dir``'s metrics.jsonl so far."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"loss"' in line for line in path.read_text().splitlines())


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rank_pid(launch_pid: int, local_rank: int) -> int:
    """The pid of the trainer rank ``local_rank`` under the launch ``launch_pid``."""
    pids = [pid for pid in _descendants(launch_pid)
            if "recipe.train" in _cmdline(pid) and f"--local_rank={local_rank}" in _cmdline(pid)]
    assert len(pids) == 1, [_cmdline(pid) for pid in _descendants(launch_pid)]
    return pids[0]
