"""Peak host memory of one rank importing a Hugging Face MoE (``train.init_from = "hf:DIR"``), per EP size.

    python -m bench.hf_import_memory            # writes a ~0.9 GB Mixtral-shaped folder to a temp dir first

Each measurement is a fresh process standing for EP rank 0 of ``ep_size``: it builds its model share
(dense + E/ep_size experts per layer), then reads the folder's weights into it with ``load_hf_weights``.
Reported: the bytes of that share, the checkpoint's bytes, and the process's peak RSS above what it held
before building the model (torch, transformers and Python themselves; the peak is reset there), so that
"peak - baseline ~ share" is the claim checked.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = dict(num_layers=4, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
             max_seq_len=256, num_experts=16, moe_gate_k=2, moe_intermediate_size=1024, moe_norm_topk_prob=True)


def _status_mb(field: str) -> float:
    return float(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


def _reset_peak() -> None:
    """Linux: VmHWM (the peak RSS) restarts from the current RSS, so imports before the baseline do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def child(hf_dir: str, ep_size: int) -> dict:
    import torch

    from recipe.config import config_from_dict
    from recipe.hf_import import load_hf_weights
    from recipe.model.transformer import TransformerLM

    config = config_from_dict({"model": {"max_seq_len": 256}, "data": {"seq_len": 16},
                               "train": {"init_from": f"hf:{hf_dir}"}})
    _reset_peak()
    baseline = _status_mb("VmRSS")
    with torch.device("meta"):
        model = TransformerLM(config, ep_size=ep_size)
    model = model.to_empty(device="cpu")  # no init: the import overwrites every weight
    share = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    load_hf_weights(model, hf_dir, config.model.hf_architecture, ep_rank=0)
    peak = _status_mb("VmHWM")
    return {"ep_size": ep_size, "share_mb": round(share, 1), "baseline_mb": round(baseline, 1),
            "peak_mb": round(peak, 1), "peak_above_baseline_mb": round(peak - baseline, 1)}


def write_folder(out: Path) -> float:
    import torch

    from recipe.config import config_from_dict
    from recipe.export import save_hf
    from recipe.model.transformer import TransformerLM

    config = config_from_dict({"model": MODEL, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    save_hf(TransformerLM(config).state_dict(), config, out)
    return (out / "model.safetensors").stat().st_size / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.hf_import_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("HF_DIR", "EP_SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--ep_sizes", default="1,2,4,8")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_mb = write_folder(Path(tmp) / "hf")
        shape = f"{MODEL['num_experts']} experts x {MODEL['num_layers']} layers"
        print(f"checkpoint: {checkpoint_mb:.1f} MB (fp32, {shape})")
        for ep_size in map(int, args.ep_sizes.split(",")):
            out = subprocess.run([sys.executable, "-m", "bench.hf_import_memory", "--child", f"{tmp}/hf", str(ep_size)],
                                 capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
