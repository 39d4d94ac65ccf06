"""moe-recipe: a DeepSpeed training recipe for Mixture-of-Experts language models."""
