"""Sample text from a trained run on one process, whatever expert-parallel size it was trained with.

    python -m recipe.generate --run_dir runs/default                      # 3 samples, each a new document
    python -m recipe.generate --run_dir runs/default --prompt "The state of the Union" --prompt "Our economy"
    python -m recipe.generate --run_dir runs/default --prompts-file prompts.txt --num_samples 6
    python -m recipe.generate --hf_dir /models/OLMoE-1B-7B --prompt "Hello" --temperature 0

Loads the newest checkpoint (every expert file, global ids) into a 1-process model (ep_size=1), or a
Hugging Face MoE folder as ``train.init_from = "hf:DIR"`` would import it, and samples with temperature
and top-k; the same --seed gives the same text, temperature 0 the greedy tokens. Sample i continues prompt
i modulo their number. Without prompts (or with an empty one) a sample starts a new document, as the training
shards do (after bos when the tokenizer adds one, else after the previous document's eos): whatever the corpus
(any language, code), it shows what the model writes unprompted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import checkpoint_root, consolidated_state_dict
from .config import config_from_dict, config_from_saved
from .data.tokenizer import load_tokenizer, tokenizer_file
from .model.transformer import TransformerLM

DOCUMENT_START = ""  # the default prompt: a sample starts a new document


def load_model(run_dir: str | Path, tag: Optional[str] = None):
    """(model in eval mode on CPU, config) from a run directory's checkpoint."""
    run_dir = Path(run_dir)
    state, client = consolidated_state_dict(checkpoint_root(run_dir), tag)
    config = config_from_saved(client["config"])
    model = TransformerLM(config, ep_size=1)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), config


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None) -> list[int]:
    """Autoregressive sampling; temperature 0 is greedy. Returns prompt + new token ids. ``vocab_size``: only ids
    below it are drawn (a published model's embedding may be padded beyond its tokenizer's ids)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    max_len = model.config.model.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:]).logits[0, -1, :vocab_size].float()  # (V,)
        if temperature == 0:
            next_id = logits.argmax()
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                threshold = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0].tolist()


def load_hf_model(hf_dir: str | Path):
    """(model in eval mode on CPU, config) imported from a Hugging Face MoE folder, as a run would start."""
    from .hf_import import load_hf_weights

    config = config_from_dict({"data": {"seq_len": 1}, "train": {"init_from": f"hf:{hf_dir}"}})
    model = TransformerLM(config, ep_size=1)
    load_hf_weights(model, hf_dir, config.model.hf_architecture)  # every weight; the routing bias starts at 0
    return model.eval(), config


def print_samples(run_dir: Optional[str | Path], num_samples: int = 3, prompts: Optional[list[str]] = None,
                  max_new_tokens: int = 60, temperature: float = 0.8, top_k: int = 50, seed: int = 0,
                  hf_dir: Optional[str | Path] = None) -> list[str]:
    """Samples from a run's newest checkpoint, or from a Hugging Face folder (``hf_dir``) with its tokenizer.
    ``prompts``: sample i continues prompt i modulo their number; none (or "") starts a new document."""
    folder = Path(hf_dir or run_dir)
    model, _ = load_hf_model(hf_dir) if hf_dir else load_model(run_dir)
    try:
        tokenizer = load_tokenizer(tokenizer_file(folder))  # tokenizer.json or tokenizer.model
    except FileNotFoundError:
        copied = "" if hf_dir else "; it is copied there when training starts"
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}{copied}") from None
    generator = torch.Generator().manual_seed(seed)
    prompts = list(prompts or [DOCUMENT_START])
    texts = []
    for i in range(num_samples):
        prompt_ids, lead = prompt_token_ids(tokenizer, prompts[i % len(prompts)])
        ids = sample(model, prompt_ids, max_new_tokens, temperature, top_k, generator,
                     vocab_size=tokenizer.vocab_size)
        text = tokenizer.decode(ids[lead:])  # a document-start token is context, not text
        texts.append(text)
        print(f"--- sample {i + 1} ---\n{text}\n", flush=True)
    return texts


def prompt_token_ids(tokenizer, prompt: str) -> tuple[list[int], int]:
    """(ids to sample after, how many of them lead the prompt's own): the prompt's tokens, or for an empty prompt
    the token a document starts after in the shards (bos when the tokenizer adds one, else eos)."""
    if prompt:
        return tokenizer.encode(prompt), 0
    start = tokenizer.bos_id if tokenizer.add_bos_token else tokenizer.eos_id
    if start < 0:
        raise ValueError("the tokenizer has neither the bos nor the eos a new document starts after; "
                         "pass --prompt TEXT")
    return [start], 1


def read_prompts_file(path: str | Path) -> list[str]:
    """The non-blank lines of ``path``, one prompt each (the newline dropped, spaces kept)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FileNotFoundError(f"--prompts-file {path}: cannot read it ({exc}); pass a UTF-8 text file, "
                                "one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompt; write one prompt per line")
    return prompts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recipe.generate", description="Sample text from a trained run.")
    parser.add_argument("--run_dir", default="runs/default", help="a training run folder (default: %(default)s)")
    parser.add_argument("--hf_dir", help="sample from this Hugging Face MoE folder instead of a run")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="text to continue (repeatable; \"\" starts a new document); default: a new document")
    parser.add_argument("--prompts-file", metavar="FILE",
                        help="more prompts, one per non-blank line, after those of --prompt")
    parser.add_argument("--num_samples", type=int, default=3, help="sample i continues prompt i mod their number")
    parser.add_argument("--max_new_tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        prompts = args.prompt + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
        print_samples(args.run_dir, args.num_samples, prompts, args.max_new_tokens, args.temperature, args.top_k,
                      args.seed, hf_dir=args.hf_dir)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError (a folder the import refuses) is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
