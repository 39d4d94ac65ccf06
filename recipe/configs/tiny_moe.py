# The classic tiny MoE: 8 experts, GShard top-2 with token dropping (the default of `make train` until the
# fine-grained tiny_finegrained.py beat the dense twin where this one does not; see README, `make compare`).
# Active parameters per token match tiny_dense.py; the MoE has 8x the FFN parameters in total. Exports to
# Hugging Face Mixtral.
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    vocab_size=4096,
    max_seq_len=256,
    mlp_ratio=8 / 3,
    multiple_of=32,
    num_experts=8,
    moe_gate_k=2,
    moe_capacity_factor=1.25,
    moe_eval_capacity_factor=2.0,
    moe_min_capacity=4,
    moe_layer_freq=1,
)
loss = dict(moe_loss_coeff=0.01)
data = dict(path="data/sotu", seq_len=128)
train = dict(steps=400, run_dir="runs/default", log_every=10, eval_every=100, eval_batches=8, save_every=200)
