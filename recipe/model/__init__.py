"""The language model and its MoE layer."""
