# The default of `make train`. A fine-grained twin of tiny_moe.py: 32 small experts (F=88, a quarter of tiny_moe's 352), top-4, one shared
# expert of width 352, dropless, aux-loss-free bias balancing. Active FFN width per token 4·88 + 352 = 704, the same
# as tiny_moe's 2·352 and tiny_dense's 704, so `make compare` sets all three side by side at equal active parameters.
# It beat tiny_dense at 400 steps on two seeds where tiny_moe did not (README, "MoE vs dense"). Bias balancing has
# no Hugging Face Mixtral/Qwen2-MoE counterpart, so `--format hf` refuses this model; `--format torch` works.
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    vocab_size=4096,
    max_seq_len=256,
    mlp_ratio=8 / 3,
    multiple_of=32,
    num_experts=32,
    moe_gate_k=4,
    moe_intermediate_size=88,
    moe_num_shared_experts=1,
    moe_shared_expert_intermediate_size=352,
    moe_drop_tokens=False,
    moe_norm_topk_prob=True,
    moe_balance_loss="switch",
    moe_bias_update_rate=1e-3,
    moe_layer_freq=1,
)
loss = dict(moe_loss_coeff=0.01)
data = dict(path="data/sotu", seq_len=128)
train = dict(steps=400, run_dir="runs/finegrained", log_every=10, eval_every=100, eval_batches=8, save_every=200)
