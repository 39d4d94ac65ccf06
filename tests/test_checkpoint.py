"""Checkpoint bookkeeping: commit only complete saves, fall back past broken ones, prune safely."""
import pytest
import torch

from recipe.checkpoint import (COMPLETE, MODEL_FILE, begin, checkpoint_root, commit, complete_tags,
                               consolidated_state_dict, latest_tag, prune, step_tag)


def fake_save(run_dir, step, world_size=2, moe_layers=1, num_experts=2, skip=()):
    """Write the files a save of this layout produces (tiny tensors), minus ``skip``."""
    folder = begin(run_dir, step_tag(step))
    names = [MODEL_FILE, "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    names += [f"recipe_rank{r}.pt" for r in range(world_size)]
    names += [f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(moe_layers) for e in range(num_experts)]
    for name in names:
        if name not in skip:
            payload = {"module": {"w": torch.full((2,), float(step))}, "num_experts": [num_experts] * moe_layers}
            if name.startswith("layer_"):
                payload = {f"ffn.deepspeed_moe.experts.deepspeed_experts.{name.split('_')[3]}.w": torch.ones(1) * step}
            torch.save(payload, folder / name)
    return folder


def test_commit_marks_complete_and_moves_latest(tmp_path):
    fake_save(tmp_path, 10)
    commit(tmp_path, step_tag(10), 2, 1, 2)
    assert latest_tag(tmp_path) == "step00000010"
    fake_save(tmp_path, 20, skip=("layer_0_expert_1_mp_rank_00_model_states.pt",))
    with pytest.raises(RuntimeError, match="incomplete.*layer_0_expert_1"):
        commit(tmp_path, step_tag(20), 2, 1, 2)
    assert latest_tag(tmp_path) == "step00000010"  # the interrupted save never became latest
    assert not (checkpoint_root(tmp_path) / "step00000020" / COMPLETE).exists()


def test_latest_falls_back_to_newest_complete(tmp_path, capsys):
    for step in (10, 20):
        fake_save(tmp_path, step)
        commit(tmp_path, step_tag(step), 2, 1, 2)
    # `latest` naming a folder that lost its marker (a save under way when the machine died).
    (checkpoint_root(tmp_path) / "latest").write_text("step00000030")
    assert latest_tag(tmp_path) == "step00000020"
    assert "not a complete checkpoint" in capsys.readouterr().err
    (checkpoint_root(tmp_path) / "latest").unlink()
    assert latest_tag(tmp_path) == "step00000020"


def test_resave_of_a_tag_starts_from_an_empty_folder(tmp_path):
    folder = fake_save(tmp_path, 10)
    commit(tmp_path, step_tag(10), 2, 1, 2)
    (folder / "stale.pt").write_bytes(b"old")
    begin(tmp_path, step_tag(10))
    assert not (folder / COMPLETE).exists() and not (folder / "stale.pt").exists()
    assert latest_tag(tmp_path) is None


def test_prune_keeps_last_k_complete_and_never_the_newest(tmp_path):
    for step in (10, 20, 30):
        fake_save(tmp_path, step)
        commit(tmp_path, step_tag(step), 2, 1, 2)
    fake_save(tmp_path, 25, skip=(MODEL_FILE,))  # an interrupted save between complete ones
    fake_save(tmp_path, 40, skip=(MODEL_FILE,))  # an interrupted save after the newest
    assert prune(tmp_path, keep_last=2) == ["step00000010", "step00000025"]
    assert complete_tags(tmp_path) == ["step00000020", "step00000030"]
    assert (checkpoint_root(tmp_path) / "step00000040").is_dir()  # may be a save in progress: left alone
    assert prune(tmp_path, keep_last=5) == []


def test_prune_killed_mid_delete_never_leaves_a_false_complete(tmp_path, monkeypatch):
    """A kill while an old checkpoint is being deleted: its folder must not pass for complete any more."""
    import recipe.checkpoint as checkpoint

    for step in (10, 20, 30):
        fake_save(tmp_path, step)
        commit(tmp_path, step_tag(step), 2, 1, 2)

    def killed_mid_rmtree(path, ignore_errors=False):  # deletes one expert file, then the process dies
        (path / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_rmtree)
    with pytest.raises(KeyboardInterrupt):
        prune(tmp_path, keep_last=2)
    assert complete_tags(tmp_path) == ["step00000020", "step00000030"]
    assert latest_tag(tmp_path) == "step00000030"
    monkeypatch.undo()
    assert prune(tmp_path, keep_last=2) == ["step00000010"]  # the next prune finishes the job
    assert not (checkpoint_root(tmp_path) / "step00000010").exists()


def test_consolidated_state_reports_missing_or_corrupt_expert_files(tmp_path):
    folder = fake_save(tmp_path, 10)
    commit(tmp_path, step_tag(10), 2, 1, 2)
    state, _ = consolidated_state_dict(checkpoint_root(tmp_path))
    assert set(state) == {"w", "ffn.deepspeed_moe.experts.deepspeed_experts.0.w",
                          "ffn.deepspeed_moe.experts.deepspeed_experts.1.w"}
    (folder / "layer_0_expert_1_mp_rank_00_model_states.pt").write_bytes(b"\x80\x02trunc")
    with pytest.raises(ValueError, match="expert_1.*truncated or corrupt"):
        consolidated_state_dict(checkpoint_root(tmp_path))
    (folder / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks expert files for MoE layer 0, experts \[1\]"):
        consolidated_state_dict(checkpoint_root(tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        consolidated_state_dict(tmp_path / "elsewhere")


def test_complete_lists_every_file_with_its_size_and_resume_names_the_damage(tmp_path):
    from recipe.checkpoint import damaged_files, recorded_files, resume_problem

    for step in (10, 20):
        fake_save(tmp_path, step)
        commit(tmp_path, step_tag(step), 2, 1, 2)
    folder = checkpoint_root(tmp_path) / "step00000020"
    recorded = recorded_files(folder)
    assert recorded == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != COMPLETE}
    assert (folder / COMPLETE).read_text().splitlines()[0] == "step00000020"  # still names its tag first
    assert resume_problem(tmp_path, "step00000020") is None

    expert = folder / "layer_0_expert_1_mp_rank_00_model_states.pt"
    expert.write_bytes(expert.read_bytes()[:10])
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert damaged_files(folder) == [f"layer_0_expert_1_mp_rank_00_model_states.pt is 10 bytes, was "
                                     f"{recorded[expert.name]} when saved",
                                     "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"]
    problem = resume_problem(tmp_path, "step00000020")
    assert problem.startswith("checkpoint step00000020 in ") and "(and 1 more)" in problem
    assert "newest intact older checkpoint is step00000010" in problem and "--resume" in problem
    assert latest_tag(tmp_path) == "step00000020"  # nothing switched behind the user's back

    # With the older one damaged too there is nothing to fall back on, and the message says so.
    (checkpoint_root(tmp_path) / "step00000010" / MODEL_FILE).write_bytes(b"")
    assert "no older intact checkpoint" in resume_problem(tmp_path, "step00000020")


def test_complete_markers_without_sizes_are_still_accepted(tmp_path):
    from recipe.checkpoint import recorded_files, resume_problem

    folder = fake_save(tmp_path, 10)
    (folder / COMPLETE).write_text("step00000010\n")  # what earlier versions of the recipe wrote
    assert latest_tag(tmp_path) == "step00000010"
    assert recorded_files(folder) is None and resume_problem(tmp_path, "step00000010") is None


def test_rank_state_keeps_its_keys_on_disk_and_reads_older_files_with_defaults(tmp_path):
    from recipe.checkpoint import RankState, load_recipe_state, save_recipe_state

    (tmp_path / "checkpoints" / "step00000001").mkdir(parents=True)
    state = RankState(step=1, loader={"position": 3}, rng={}, world_size=2, ep_size=2, rank=1, ep_rank=1,
                      expert_dp_rank=0, zero_stage=2, precision="fp32")
    save_recipe_state(tmp_path, "step00000001", 1, state)
    on_disk = torch.load(tmp_path / "checkpoints" / "step00000001" / "recipe_rank1.pt", weights_only=False)
    assert set(on_disk) == {"step", "loader", "rng", "world_size", "ep_size", "rank", "ep_rank", "expert_dp_rank",
                            "zero_stage", "precision", "tp_size", "tp_rank"}  # optimizer_param_names: plain torch
    assert load_recipe_state(tmp_path, "step00000001", 1) == state
    older = {"step": 5, "loader": {}, "rng": {}, "world_size": 1, "ep_size": 1}  # before layout fields existed
    torch.save(older, tmp_path / "checkpoints" / "step00000001" / "recipe_rank0.pt")
    loaded = load_recipe_state(tmp_path, "step00000001", 0)
    assert (loaded.step, loaded.ep_rank, loaded.zero_stage, loaded.precision) == (5, None, None, None)
    assert (loaded.tp_size, loaded.tp_rank) == (1, 0)  # before tensor parallelism: none
