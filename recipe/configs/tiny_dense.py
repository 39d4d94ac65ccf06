# The dense twin of tiny_moe.py: same attention and embeddings, and one SwiGLU FFN per block with
# k=2 experts' worth of hidden units, so each token sees the same active parameters and FLOPs.
model_type = "INTERNLM"
model = dict(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    vocab_size=4096,
    max_seq_len=256,
    intermediate_size=2 * 352,  # 2 x the expert width of tiny_moe.py (128 * 8/3 -> 352)
)
loss = dict(moe_loss_coeff=0.0)
data = dict(path="data/sotu", seq_len=128)
train = dict(steps=400, run_dir="runs/dense", log_every=10, eval_every=100, eval_batches=8, save_every=200)
