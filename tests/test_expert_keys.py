"""recipe.model.expert_keys: the expert-key rule (per-expert and stacked forms, local and global ids)."""
import pytest
import torch

from recipe.model.expert_keys import (ExpertKey, expert_key, global_keys, global_to_local, is_expert_parameter,
                                      local_to_global, parse_expert_key, parse_stacked, shard_experts, stacked_keys)

GROUP = "blocks.1.ffn.deepspeed_moe.experts."
NUM_EXPERTS = 8


def test_parse_a_per_expert_key_and_build_it_back():
    key = "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.3.w1.weight"
    assert parse_expert_key(key) == ExpertKey(GROUP, 3, "w1.weight")
    assert expert_key(GROUP, 3, "w1.weight") == key
    # Relative to the expert group itself (what its state-dict hooks see), the group prefix is empty.
    assert parse_expert_key("deepspeed_experts.12.inner.w2.bias") == ExpertKey("", 12, "inner.w2.bias")


@pytest.mark.parametrize("key", [
    "blocks.1.ffn.deepspeed_moe.gate.wg.weight",  # the router: every expert's, no single one's
    "blocks.1.ffn.deepspeed_moe.experts.w1",  # stacked: several experts
    "blocks.0.shared_mlp.w1.weight",
    "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.x.w1.weight",  # no id
    "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.3",  # no name inside the expert
    "blocks.1.ffn.my_deepspeed_experts.3.w1.weight",  # the marker must be a whole name
])
def test_keys_of_no_single_expert_are_not_parsed_and_pass_unchanged(key):
    assert parse_expert_key(key) is None
    assert local_to_global(key, ep_rank=1, num_local_experts=2) == key
    assert global_to_local(key, ep_rank=1, num_local_experts=2) == key


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_local_global_local_round_trip(ep_size):
    num_local = NUM_EXPERTS // ep_size
    owners = {}
    for ep_rank in range(ep_size):
        for local in range(num_local):
            key = expert_key(GROUP, local, "w3.weight")
            global_key = local_to_global(key, ep_rank, num_local)
            owners[parse_expert_key(global_key).expert] = ep_rank
            assert global_to_local(global_key, ep_rank, num_local) == key
            # Every other rank does not hold it.
            assert all(global_to_local(global_key, other, num_local) is None
                       for other in range(ep_size) if other != ep_rank)
    assert owners == {e: e // num_local for e in range(NUM_EXPERTS)}  # each global expert on exactly one rank


def test_local_id_beyond_the_rank_is_refused():
    with pytest.raises(ValueError, match="local expert id 2"):
        local_to_global(expert_key(GROUP, 2, "w1.weight"), ep_rank=0, num_local_experts=2)


def test_expert_parameters_in_both_forms():
    assert is_expert_parameter(GROUP + "w1")
    assert is_expert_parameter(expert_key(GROUP, 0, "w1.weight"))
    assert is_expert_parameter("deepspeed_moe.experts.w2")  # a lone layer's parameter
    assert not is_expert_parameter("blocks.1.ffn.deepspeed_moe.gate.wg.weight")
    assert not is_expert_parameter("blocks.0.shared_mlp.w1.weight")


def test_stacked_names_and_their_per_expert_keys():
    assert parse_stacked(GROUP + "w2") == (GROUP, "w2")
    assert parse_stacked("deepspeed_moe.experts.w1") == ("deepspeed_moe.experts.", "w1")
    assert parse_stacked(GROUP + "w4") is None and parse_stacked("blocks.0.ffn.w1") is None
    assert stacked_keys(GROUP, "w2", [4, 5]) == [expert_key(GROUP, 4, "w2.weight"), expert_key(GROUP, 5, "w2.weight")]
    # A stacked weight on rank 2 of 4 covers global experts 4 and 5; a per-expert one its own id.
    assert global_keys(GROUP + "w2", ep_rank=2, num_local_experts=2) == stacked_keys(GROUP, "w2", [4, 5])
    assert global_keys(expert_key(GROUP, 1, "w2.weight"), 2, 2) == [expert_key(GROUP, 5, "w2.weight")]
    assert global_keys("norm.weight", 2, 2) == ["norm.weight"]


def test_shard_experts_keeps_the_rank_s_experts_renumbered():
    state = {"norm.weight": torch.ones(1)}
    state.update({expert_key(GROUP, e, "w1.weight"): torch.full((1,), float(e)) for e in range(4)})
    shard = shard_experts(state, ep_rank=1, num_local_experts=2)
    assert set(shard) == {"norm.weight", expert_key(GROUP, 0, "w1.weight"), expert_key(GROUP, 1, "w1.weight")}
    assert [shard[expert_key(GROUP, i, "w1.weight")].item() for i in range(2)] == [2.0, 3.0]
