"""Write a Llama-shaped model with random weights as an HF folder (sharded safetensors + index), with the
tokenizer of another folder, so benchmarks can run models of any size without a download.

Shapes by name (`--shape`), or any of them overridden by flag:
  smollm2   hidden 576,  MLP 1536,  9 heads / 3 KV heads, 30 layers (SmolLM2-135M)
  qwen05    hidden 896,  MLP 4864, 14 heads / 2 KV heads, 24 layers (Qwen2.5-0.5B's layers)
  tinyllama hidden 2048, MLP 5632, 32 heads / 4 KV heads, 22 layers (TinyLlama-1.1B)
  llama7b   hidden 4096, MLP 11008, 32 heads / 32 KV heads, 32 layers (Llama-2-7B)
  qwen05-untied  hidden 896, MLP 4864, 14 heads / 2 KV heads, 24 layers, vocabulary 151,936, untied head

  python pipelines/synthetic_llama.py OUT --shape llama7b --layers 2 --tokenizer smollm2-135m

The weights are N(0, 0.02²) (the Llama initialiser's std), norms 1; the vocabulary is the tokenizer's,
or `--vocab` rows when larger (the extra rows are never produced by the tokenizer).
Parameters are created one tensor at a time in the storage dtype, so peak memory is about one shard.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "smollm2": {"hidden": 576, "mlp": 1536, "heads": 9, "kv_heads": 3, "layers": 30},
    "qwen05": {"hidden": 896, "mlp": 4864, "heads": 14, "kv_heads": 2, "layers": 24},
    "tinyllama": {"hidden": 2048, "mlp": 5632, "heads": 32, "kv_heads": 4, "layers": 22},
    "llama7b": {"hidden": 4096, "mlp": 11008, "heads": 32, "kv_heads": 32, "layers": 32},
    # Qwen2.5-0.5B's shape with its 151,936-token vocabulary and (unlike it) an LM head of its own: the case
    # where the two vocabulary matrices outweigh several blocks
    "qwen05-untied": {"hidden": 896, "mlp": 4864, "heads": 14, "kv_heads": 2, "layers": 24, "vocab": 151936},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tensor_shapes(hidden: int, mlp: int, heads: int, kv_heads: int, layers: int, vocab: int, tied: bool):
    """Return [(name, shape)] of a LlamaForCausalLM's state dict, in file order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)),
            (p + "mlp.up_proj.weight", (mlp, hidden)),
            (p + "mlp.down_proj.weight", (hidden, mlp)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def write_model(out: Path, tokenizer: Path, shape: dict, dtype: torch.dtype, shard_mb: int, seed: int) -> int:
    """Write the folder; return its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    vocab = max(len(tok), shape.get("vocab") or 0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=shape["tied"],
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    names = tensor_shapes(
        vocab=vocab, **{k: shape[k] for k in ("hidden", "mlp", "heads", "kv_heads", "layers")}, tied=shape["tied"]
    )
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # tensors per shard, planned before any is made
    size = 0
    for name, dims in names:
        nbytes = torch.Size(dims).numel() * dtype.itemsize
        if plan[-1] and size + nbytes > shard_mb * 2**20:
            plan.append([])
            size = 0
        plan[-1].append((name, dims))
        size += nbytes
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i, planned in enumerate(plan):  # one shard in memory at a time
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {
            name: torch.ones(dims, dtype=dtype)
            if len(dims) == 1
            else torch.randn(dims, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)
            for name, dims in planned
        }
        save_file(shard, out / file, metadata={"format": "pt"})
        for name, t in shard.items():
            index["weight_map"][name] = file
            index["metadata"]["total_size"] += t.numel() * t.element_size()
        del shard
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(torch.Size(d).numel() for _, d in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    for key in ("hidden", "mlp", "heads", "kv_heads", "layers", "vocab"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--untied", action="store_true", help="a separate LM head (SmolLM2 ties it)")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="folder or named model to take it from")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shard-mb", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SHAPES[args.shape].items()}
    shape["vocab"] = args.vocab or shape.get("vocab")
    shape["tied"] = args.shape == "smollm2" and not args.untied  # Llama-2 and the qwen05-untied shape: untied
    if args.out.exists():
        if not args.overwrite:
            raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
        shutil.rmtree(args.out)
    tokenizer = Path(args.tokenizer)
    if not tokenizer.is_dir():
        from lrsurgery.hf.resolve import resolve_model

        tokenizer = resolve_model(args.tokenizer)
    params = write_model(args.out, tokenizer, shape, DTYPES[args.dtype], args.shard_mb, args.seed)
    print(f"wrote {args.out}: {params / 1e6:.1f}M parameters, {shape}")


if __name__ == "__main__":
    main()
