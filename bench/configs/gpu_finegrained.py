# `make gpu-check`'s training smoke: a fine-grained MoE of ~105M active parameters (about 460M in total) for one
# GPU in bf16. 8 blocks of width 1024 (16 heads), every FFN an MoE of 64 experts of width 256, top-8, dropless,
# plus one shared expert of width 512, aux-loss-free bias balancing beside a small switch loss (as
# recipe/configs/tiny_finegrained.py). Active per token: attention 8·4·1024² = 33.6M, routed experts
# 8·8·3·1024·256 = 50.3M, shared experts 8·3·1024·512 = 12.6M, routers 0.5M, embedding and head 2·4096·1024 = 8.4M.
# Not a training recipe: bench/gpu_check.py runs 50 steps of it to measure tokens/s and MFU.
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=8,
    hidden_size=1024,
    num_attention_heads=16,
    vocab_size=4096,
    max_seq_len=1024,
    mlp_ratio=8 / 3,
    multiple_of=256,
    num_experts=64,
    moe_gate_k=8,
    moe_intermediate_size=256,
    moe_num_shared_experts=1,
    moe_shared_expert_intermediate_size=512,
    moe_drop_tokens=False,
    moe_norm_topk_prob=True,
    moe_balance_loss="switch",
    moe_bias_update_rate=1e-3,
    moe_balance_over_data_parallel=False,
    moe_layer_freq=1,
)
loss = dict(moe_loss_coeff=0.001)
data = dict(path="data/sotu", seq_len=1024)
train = dict(steps=50, run_dir="runs/gpu_check", log_every=10, eval_every=10**9, eval_batches=2, save_every=10**9,
             wandb="disabled")
