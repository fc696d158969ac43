"""GCG on a GPU at the paper's sizes: a random-weight model of Llama-3-8B's shape in bfloat16.

Two measurements, each engine side by side on the same model, prompts, targets and settings
(search width 512, top-k 256, 20-token suffix by default):

1. seconds per step: ``--steps`` steps on one prompt, no early stop;
2. time to success: on ``--prompts`` harmful val instructions, each from the "x" suffix to a
   target that is known to be reachable: the model's own greedy ``--target-tokens``-token
   continuation of the prompt with a random suffix (seeded). Steps and seconds until the
   target is the greedy continuation (checked the same way for both, after the run), under a
   budget of ``--max-steps`` steps and ``--max-seconds`` seconds per run.

Random weights: the numbers are those of the shape, not of a trained model's loss landscape.
Model weights cannot be downloaded on the GPU machines; the model is built from its config
and the tokenizer (the organism's, 49,152 tokens; the model keeps Llama-3's 128,256-row
embedding, whose other rows no suffix may use) is read from ``--tokenizer``. Write it once
where the organism is cached, then carry that folder to the GPU machine:

    python benchmarks/bench_gcg_gpu.py --save-tokenizer benchmarks/tokenizer   # here, seconds
    python benchmarks/bench_gcg_gpu.py --tokenizer benchmarks/tokenizer        # on one H100, < 10 min

nanoGCG runs where ``--nanogcg-python`` / ``$NANOGCG_PYTHON`` (or the suite's env) has it;
else only the suite's engine runs, and it says so. ``--shape tiny --device cpu --dtype
float32`` checks the whole script on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gcg_tts import summarize, time_to_success  # noqa: E402

SHAPES = {
    # Llama-3-8B (config of meta-llama/Meta-Llama-3-8B-Instruct)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # the same structure, small enough for a CPU check
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def random_chat_model(shape: str, tokenizer_dir: str, dtype: torch.dtype, device: str, seed: int = 0):
    """A ChatModel around a random-weight LlamaForCausalLM of ``shape``, with the tokenizer in ``tokenizer_dir``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from suffix_analysis.models.chat import ChatFormat, refusal_token_ids
    from suffix_analysis.models.loading import ChatModel
    from suffix_analysis.models.presets import arch_for

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "left"
    if len(tok) > SHAPES[shape]["vocab_size"]:
        sys.exit(f"bench_gcg_gpu: the tokenizer has {len(tok)} tokens, more than the shape's vocabulary")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
        # Unembedding rows that no tokenizer id names predict logit 0, below the named rows'
        # largest: greedy continuations stay text that a target can be written in.
        with torch.no_grad():
            model.lm_head.weight[len(tok):] = 0
    return ChatModel(model=model, tokenizer=tok, chat=ChatFormat.from_tokenizer(tok), name=f"random-{shape}",
                     preset=None, refusal_ids=refusal_token_ids(tok, ("I",)), arch=arch_for("llama"))


@torch.no_grad()
def reachable_target(cm, instruction: str, n_tokens: int, suffix_len: int, seed: int) -> tuple[str, str]:
    """The model's greedy ``n_tokens``-token continuation of the prompt with a random suffix,
    and that suffix: a target some suffix is known to reach (checked as the engines' success
    is; other random suffixes are tried where the text does not re-encode to the same tokens)."""
    from suffix_analysis.attacks.nanogcg_adapter import target_is_greedy
    from suffix_analysis.models.suffixes import allowed_token_mask

    gen = torch.Generator().manual_seed(seed)
    allowed = allowed_token_mask(cm.tokenizer, cm.model.get_input_embeddings().weight.shape[0]).nonzero().flatten()
    for _ in range(20):
        suffix = cm.tokenizer.decode(allowed[torch.randint(len(allowed), (suffix_len,), generator=gen)]).strip()
        ids = cm.chat.tokenize([instruction], [suffix])[0]
        out: list[int] = []
        for _ in range(n_tokens):
            logits = cm.model(input_ids=torch.tensor([ids + out], device=cm.device)).logits[0, -1]
            out.append(int(logits.argmax()))
        target = cm.tokenizer.decode(out)
        if target.strip() and target_is_greedy(cm, instruction, suffix, target):
            return target, suffix
    sys.exit(f"bench_gcg_gpu: no reachable target found for {instruction!r} in 20 random suffixes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer", default=str(HERE / "tokenizer"), help="folder written by --save-tokenizer")
    ap.add_argument("--save-tokenizer", metavar="DIR", help="write the organism's tokenizer to DIR and exit")
    ap.add_argument("--steps", type=int, default=10, help="steps of the seconds-per-step measurement")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--target-tokens", type=int, default=4)
    ap.add_argument("--search-width", type=int, default=512)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=20)
    ap.add_argument("--nanogcg-python", default=os.environ.get("NANOGCG_PYTHON"))
    args = ap.parse_args()
    if args.save_tokenizer:
        from suffix_analysis.models.loading import load_model

        load_model("smollm2-135m-refusal", device="cpu").tokenizer.save_pretrained(args.save_tokenizer)
        print(f"tokenizer written to {args.save_tokenizer}")
        return
    if args.steps < 1 or args.max_steps < 1 or args.max_seconds <= 0 or args.prompts < 1:
        sys.exit("bench_gcg_gpu: --steps, --max-steps and --prompts must be at least 1, --max-seconds above 0")
    if not Path(args.tokenizer, "tokenizer.json").is_file():
        sys.exit(f"bench_gcg_gpu: no tokenizer at {args.tokenizer}; write one with --save-tokenizer DIR where the "
                 "organism is cached, and carry it")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gcg_gpu: no CUDA device here; on a CPU check the script with --shape tiny --device cpu "
                 "--dtype float32")
    from suffix_analysis.attacks import nanogcg_env
    from suffix_analysis.attacks.gcg import GCG, GCGConfig
    from suffix_analysis.attacks.nanogcg_adapter import NanoGCGConfig, init_string, target_is_greedy
    from suffix_analysis.datasets import load_instructions
    from suffix_analysis.errors import UserError

    python = nanogcg_env.resolve_python(args.nanogcg_python or "")
    try:
        nanogcg_env.check_python(python)
    except UserError as e:
        print(f"nanoGCG will not run: {e}")
        python = None
    t0 = time.perf_counter()
    cm = random_chat_model(args.shape, args.tokenizer, getattr(torch, args.dtype), args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    n_params = sum(p.numel() for p in cm.model.parameters())
    print(f"random {args.shape} ({n_params / 1e9:.2f} B parameters), {args.dtype} on {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, built in "
          f"{time.perf_counter() - t0:.0f} s; width {args.search_width}, top-k {args.topk}, suffix {args.suffix_len}",
          flush=True)
    instructions = [x.instruction for x in load_instructions("harmful:val")][: args.prompts]
    targets = [reachable_target(cm, x, args.target_tokens, args.suffix_len, seed=i)[0]
               for i, x in enumerate(instructions)]
    sizes = dict(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len, init="x")
    init = init_string(cm.tokenizer, "x", args.suffix_len)

    with tempfile.TemporaryDirectory(prefix="bench_gcg_gpu_") as work:
        spec = nanogcg_env.export_model(cm, Path(work) / "model") if python else None

        def ours(instr, target, **kw):
            sync()
            r = GCG(GCGConfig(**sizes, checkpoint_every=0, **kw)).run(cm, [instr], [target])
            return r.extra["steps"], r.step_seconds, r.suffix

        def theirs(instr, target, **kw):
            spec.update(instruction=instr, target=target, threads=torch.get_num_threads(),
                        max_seconds=kw.pop("time_limit", 0), gcg=NanoGCGConfig(**sizes, **kw).gcg_arguments(init))
            r = nanogcg_env.run_nanogcg(python, spec, Path(work))
            return len(r["losses"]), r["step_seconds"], r["best_string"]

        engines = [("ours", ours)] + ([("nanogcg", theirs)] if python else [])
        per_step = {}
        for name, fn in engines:
            _, secs, _ = fn(instructions[0], targets[0], num_steps=args.steps, early_stop=False)
            per_step[name] = statistics.median(secs[1:] or secs)  # the first step warms the kernels up
            print(f"{name:8s} {per_step[name]:.3f} s/step (median of {len(secs) - 1 or 1})", flush=True)
        if "nanogcg" in per_step:
            print(f"speed-up {per_step['nanogcg'] / per_step['ours']:.2f}x fewer seconds per step")
        runs = []
        for name, fn in engines:
            for p, (instr, target) in enumerate(zip(instructions, targets)):
                steps, secs, suffix = fn(instr, target, num_steps=args.max_steps, early_stop=True,
                                         time_limit=args.max_seconds)
                ok = target_is_greedy(cm, instr, suffix, target)
                runs.append(dict(engine=name, prompt=p, seed=0, steps=steps, seconds=sum(secs),
                                 tts=time_to_success(ok, sum(secs), args.max_seconds)))
                print(f"{name:8s} prompt {p}: target {target!r}: {steps} steps {sum(secs):.1f} s "
                      f"{'success' if ok else 'no success'}", flush=True)
        summarize(runs, [e for e, _ in engines])


if __name__ == "__main__":
    main()
