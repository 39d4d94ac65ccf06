# An InternEvo 7B-MoE-shaped config (InternLM-7B trunk, 4 experts top-2 in every layer).
# Validated and parameter-counted by the tests; it is not trained on the CPU machines.
SEQ_LEN = 2048
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    vocab_size=103168,
    max_seq_len=SEQ_LEN,
    mlp_ratio=8 / 3,
    multiple_of=256,
    num_experts=4,
    moe_gate_k=2,
    moe_capacity_factor=1.0,
    moe_eval_capacity_factor=1.0,
    moe_min_capacity=4,
    moe_layer_freq=1,
    checkpoint=True,
)
loss = dict(moe_loss_coeff=0.01)
data = dict(path="data/your_corpus", seq_len=SEQ_LEN)
train = dict(steps=50000, run_dir="runs/internevo_7b_moe", log_every=10, eval_every=1000, save_every=1000)
