"""Head attribution two ways, side by side: this suite's direct_attribution against the TransformerLens cache.

The quantity: for N prompts, every head's output at the last position (the last EOI token)
projected onto the unit direction, every layer: ``[N, n_layers, n_heads]``.

(a) ``suffix_analysis.attribution.direct_attribution``: hooks only on what it needs
    (``attn.hook_z``, ``hook_mlp_out``, the residual stream), only the EOI positions kept,
    ``W_O`` read out along the direction once (``[n_heads, d_head]`` per layer), no unembedding,
    the chat prefix every prompt shares run once and prompts of similar length batched together.
(b) the obvious TransformerLens way: ``to_bridge`` over a fresh copy of the model,
    ``bridge.run_with_cache(tokens, attention_mask=...)`` keeping the whole cache (every hook,
    every position, the logits), then ``cache.stack_head_results(pos_slice=-1)`` (each head's
    ``blocks.{l}.attn.hook_z`` through ``W_O``) projected on the direction. The same numbers
    by hand from ``hook_z`` and ``bridge.W_O`` are checked on the first batch.

    python benchmarks/bench_attribution.py [--model smollm2-135m-refusal] [--n-prompts 128] [--batch-size 16]
    python benchmarks/bench_attribution.py --tiny        # a tiny random model: checks the script in seconds

Time: wall clock, after one warm-up batch of each. Memory: on the CPU, the process's peak
resident set size during each method above its level just before it (``VmHWM`` of
/proc/self/status, reset through /proc/self/clear_refs; where that is refused, RSS sampled
every 2 ms), with freed memory handed back to the OS (``malloc_trim``) before each; on a GPU,
``torch.cuda.max_memory_allocated`` above the allocation before. The direction is a seeded
random unit vector: the projection is linear, so any direction compares the two the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile
import threading
import time
from pathlib import Path

import torch


def trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory of a block above its start, in bytes (``.peak``); ``.how`` says how it was measured."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM (reset via /proc/self/clear_refs)"
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.sampler = _status_kib("VmRSS") * 1024, None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            self.how, self.sampled, self.stop = "RSS sampled every 2 ms", self.base, threading.Event()

            def sample() -> None:
                while not self.stop.wait(0.002):
                    self.sampled = max(self.sampled, _status_kib("VmRSS") * 1024)

            self.sampler = threading.Thread(target=sample, daemon=True)
            self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.sampler is None:
            self.peak = _status_kib("VmHWM") * 1024 - self.base
        else:
            self.stop.set()
            self.sampler.join()
            self.peak = self.sampled - self.base


def tiny_folder(folder: Path, instructions: list[str]) -> Path:
    """A random 4-layer Llama in ``folder``, with a byte-level BPE tokenizer (ChatML template)
    trained on ``instructions``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from suffix_analysis.models.presets import TEMPLATES

    specials = ["<|im_end|>", "<pad>", "<|im_start|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(instructions + ["user assistant system I cannot help with that."],
                           trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TEMPLATES["chatml"]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def timed(cm, fn):
    if cm.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cm.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model from a config instead of --model")
    ap.add_argument("--n-prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", help="float32 by default, so that the two agree to rounding")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-attribution-") as tmp:
        bench(args, Path(tmp))


def bench(args: argparse.Namespace, tmp: Path) -> None:
    from suffix_analysis.attribution import direct_attribution
    from suffix_analysis.attribution.batches import batch_slices
    from suffix_analysis.datasets import shipped
    from suffix_analysis.models.loading import load_model, to_bridge

    harmful = [x.instruction for x in shipped("harmful")]
    prompts = [harmful[i % len(harmful)] for i in range(args.n_prompts)]
    source = str(tiny_folder(tmp, harmful + [x.instruction for x in shipped("harmless")])) if args.tiny else args.model
    cm = load_model(source, device=args.device, dtype=args.dtype)
    fresh = load_model(source, device=args.device, dtype=args.dtype)  # the bridge rewrites its model in place
    bridge = to_bridge(fresh)
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0))
    unit = (r / r.norm()).to(cm.device)
    name = "a tiny random Llama" if args.tiny else args.model
    print(f"model {name}: {n_layers} layers x {n_heads} heads, d_model {cm.d_model}, on {cm.device} ({cm.dtype}); "
          f"{len(prompts)} prompts, batch {args.batch_size}; direction: a seeded random unit vector")

    def ours(items: list[str]) -> torch.Tensor:
        return direct_attribution(cm, items, r, batch_size=args.batch_size).heads[..., -1]  # [n, n_layers, n_heads]

    @torch.no_grad()
    def lens(items: list[str]) -> torch.Tensor:
        out = []
        for part in batch_slices(len(items), args.batch_size):
            batch = fresh.chat.encode(items[part], device=fresh.device)
            _, cache = bridge.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
            results = cache.stack_head_results(layer=-1, pos_slice=-1)  # [n_layers * n_heads, batch, d_model]
            out.append((results.float() @ unit).T.reshape(-1, n_layers, n_heads).cpu())
            del cache, results
        return torch.cat(out)

    ours(prompts[:2])  # warm-up: first-call costs out of both timings
    lens(prompts[:2])
    with PeakMemory(cm.device) as mem_a:
        a, t_a = timed(cm, lambda: ours(prompts))
    with PeakMemory(cm.device) as mem_b:
        b, t_b = timed(cm, lambda: lens(prompts))

    with torch.no_grad():  # the by-hand TransformerLens reading of the first batch: hook_z through W_O
        first = prompts[:args.batch_size]
        batch = fresh.chat.encode(first, device=fresh.device)
        _, cache = bridge.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
        z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][:, -1] for l in range(n_layers)], 1)  # [b, L, H, d_head]
        by_hand = torch.einsum("blhd,lhde,e->blh", z.float(), bridge.W_O.float(), unit).cpu()

    diff = (a - b).abs().max().item()
    diff_hand = (a[:len(first)] - by_hand).abs().max().item()
    mib = 2 ** 20
    print(f"memory: {mem_a.how}")
    print(f"{'':28s}{'time':>10s}{'peak memory':>16s}")
    print(f"{'(a) direct_attribution':28s}{t_a:9.2f}s{mem_a.peak / mib:12.1f} MiB")
    print(f"{'(b) TransformerLens cache':28s}{t_b:9.2f}s{mem_b.peak / mib:12.1f} MiB")
    ratio_mem = mem_b.peak / mem_a.peak if mem_a.peak > 0 else float("inf")
    print(f"{'ratio (b) / (a)':28s}{t_b / t_a:9.2f}x{ratio_mem:12.1f}x")
    print(f"max |(a) - (b)| {diff:.2e} (stack_head_results), {diff_hand:.2e} (hook_z @ W_O by hand, first batch): "
          f"{'OK' if max(diff, diff_hand) < 1e-4 else 'MISMATCH'} at 1e-4")


if __name__ == "__main__":
    main()
