"""MoE building blocks: gating (pure math), experts, dispatch (the only communication), the layer."""
from .deepspeed_baseline import DeepSpeedBaselineMoE
from .dispatch import AllToAllDispatcher, LocalDispatcher
from .experts import (ModuleListExperts, SwiGLU, SwiGLUExperts, build_experts, ffn_intermediate_size,
                      register_expert, registered_experts)
from .gating import (GateOutput, assign_capacity, expert_capacity, get_gate, load_balancing_loss, register_gate,
                     router_statistics, top_k_gating)
from .layer import MoE, MoEBase, MoEOutput, RoutingStats, ShardedMoE

__all__ = [
    "AllToAllDispatcher", "DeepSpeedBaselineMoE", "LocalDispatcher", "ModuleListExperts", "SwiGLU", "SwiGLUExperts",
    "build_experts",
    "ffn_intermediate_size", "register_expert", "registered_experts", "GateOutput", "assign_capacity",
    "expert_capacity", "get_gate", "load_balancing_loss", "register_gate", "router_statistics", "top_k_gating",
    "MoE", "MoEBase", "MoEOutput", "RoutingStats", "ShardedMoE",
]
