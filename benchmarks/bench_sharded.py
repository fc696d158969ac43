"""A random-weight model of Llama-3-70B's shape, larger than one GPU in bf16, placed with
accelerate over the GPUs present (and the CPU for what does not fit), then `direction`
extraction on a reduced data set and a 3-step GCG run; memory per device and times.

No weights are downloaded or written: the model is built on ``meta`` from its config, each
parameter is drawn (normal, std 0.02, seeded) directly on the device the map gives it, and
``dispatch_model`` adds accelerate's hooks, as ``from_pretrained(device_map=...)`` would. The
tokenizer is the tests' small ChatML one (ids below its 400 tokens; the embedding is the
full 128256 rows).

    python benchmarks/bench_sharded.py                       # Llama-3-70B shape, bf16, on the GPUs present
    python benchmarks/bench_sharded.py --max-memory 0=100GiB,cpu=100GiB
    python benchmarks/bench_sharded.py --shape tiny          # checks the script in seconds (CPU: no map)

Printed: the model's bf16 size against the first GPU's memory, the device map's split,
peak memory per GPU (``torch.cuda.max_memory_allocated``) and the process's peak RSS, and
the seconds of each step.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPES = {
    # Meta-Llama-3-70B-Instruct's config.json
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512),
}


def build(shape: str, max_memory: str | None, dtype: torch.dtype):
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from suffix_analysis.models.chat import ChatFormat, refusal_token_ids
    from suffix_analysis.models.loading import ChatModel
    from suffix_analysis.models.placement import parse_max_memory
    from suffix_analysis.models.presets import arch_for

    tok = make_tokenizer("chatml")
    tok.padding_side = "left"
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.is_available()
    if gpu:
        device_map = infer_auto_device_map(model, max_memory=parse_max_memory(max_memory) if max_memory else None,
                                           no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
    else:
        device_map = {"": "cpu"}
    gen = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        owner = max((k for k in device_map if name == k or name.startswith(k + ".") or k == ""), key=len)
        dev = device_map[owner]
        dev = f"cuda:{dev}" if isinstance(dev, int) else dev
        if dev == "disk":
            raise SystemExit("bench_sharded: the map sends weights to disk; raise --max-memory cpu=...")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        g = torch.Generator(device=dev).manual_seed(seed)
        value = (torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dtype)
        if "norm" in name:
            value = torch.ones(p.shape, device=dev, dtype=dtype)
        set_module_tensor_to_device(model, name, dev, value=value)
    # the rotary inverse frequencies are a buffer computed at init: on meta, so made again
    rot = device_map.get("model.rotary_emb", device_map.get("model", device_map.get("", 0)))
    rot = f"cuda:{rot}" if isinstance(rot, int) else rot
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(rot)
    if gpu:
        model = dispatch_model(model, device_map=device_map)
        model.hf_device_map = device_map  # as from_pretrained sets it: ChatModel.dispatched reads it
    model.eval()
    cm = ChatModel(model=model, tokenizer=tok, chat=ChatFormat.from_tokenizer(tok), name=f"random-{shape}",
                   preset=None, refusal_ids=refusal_token_ids(tok, ("I",)), arch=arch_for("llama"))
    return cm, n_params, device_map


def split(device_map: dict) -> str:
    counts: dict = {}
    for name, dev in device_map.items():
        if ".layers." in f".{name}." and name.split(".")[-1].isdigit():
            counts[str(dev)] = counts.get(str(dev), 0) + 1
    return ", ".join(f"{dev}: {n} layers" for dev, n in counts.items()) or str(set(device_map.values()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-70b")
    ap.add_argument("--max-memory", help="accelerate's caps, e.g. 0=120GiB,cpu=100GiB (default: what is free)")
    ap.add_argument("--n", type=int, default=8, help="instructions per class for the direction")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32

    from suffix_analysis.attacks.gcg import GCG, GCGConfig
    from suffix_analysis.datasets import load_instructions
    from suffix_analysis.directions.extract import diff_in_means

    t0 = time.perf_counter()
    cm, n_params, device_map = build(args.shape, args.max_memory, dtype)
    t_build = time.perf_counter() - t0
    size = n_params * torch.finfo(dtype).bits // 8
    print(f"model        random {args.shape}: {n_params / 1e9:.2f} B parameters, {size / 2**30:.1f} GiB in {dtype}")
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        print(f"one GPU      {total / 2**30:.1f} GiB: the model {'does not fit' if size > total else 'fits'} on it whole")
        print(f"device map   {split(device_map)} (built in {t_build:.0f} s)")
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    harmful = [x.instruction for x in load_instructions("harmful:train")][: args.n]
    harmless = [x.instruction for x in load_instructions("harmless:train")][: args.n]
    t0 = time.perf_counter()
    cands = diff_in_means(cm, harmful, harmless, batch_size=4)
    t_dir = time.perf_counter() - t0
    layer = cm.n_layers // 2
    direction = cands[-1, layer].float()
    print(f"direction    {t_dir:8.1f} s  candidates {tuple(cands.shape)}, finite: {bool(torch.isfinite(cands).all())}")
    cfg = GCGConfig(suffix_len=8, num_steps=args.steps, search_width=16, topk=16, objective="target+direction",
                    direction_floor=False, seed=0)
    t0 = time.perf_counter()
    res = GCG(cfg, direction=(direction, layer)).run(cm, harmful[:1], ["Sure, here is"])
    t_gcg = time.perf_counter() - t0
    print(f"attack gcg   {t_gcg:8.1f} s  {args.steps} steps, losses {[round(x, 3) for x in res.losses]}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}       peak {torch.cuda.max_memory_allocated(i) / 2**30:7.1f} GiB allocated")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"process      peak RSS {rss:.1f} GiB")


if __name__ == "__main__":
    main()
