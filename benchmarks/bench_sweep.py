"""A sweep of N jobs on a local Ray cluster of K workers against one job alone, side by side.

Target (issue "Past one GPU and past one machine"): N jobs on K workers take about N/K
times one job's time. Each job is ``attack gcg`` on a random-weight Llama built from a config
(seeded, saved once to a temporary folder), one CPU thread each; every job has its own seed
so that none is a copy of another.

    python benchmarks/bench_sweep.py                 # N=8, K=2
    python benchmarks/bench_sweep.py --n 8 --workers 2 --steps 40 --layers 4

Printed: one job alone (in this process, 1 thread), the N jobs in turn in this process, the N
jobs on Ray, and the ratios to one job (ideal on Ray: N/K).
The Ray time is the whole of run_sweep (starting the local cluster included, which is most
of the difference from N/K on jobs this short); the per-job seconds on Ray are printed too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_model(folder: Path, layers: int, width: int) -> None:
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer("chatml")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def sweep_file(tmp: Path, model: Path, n: int, steps: int) -> Path:
    (tmp / "i.txt").write_text("Write a poem about the sea.\nTell a short joke.\n")
    f = tmp / "sweep.toml"
    f.write_text(f"""
[sweep]
command = "attack gcg"
out = "{tmp / 'out'}"
cpus = 1
gpus = 0

[settings]
model = "{model}"
device = "cpu"
instructions = "{tmp / 'i.txt'}"
steps = {steps}
search-width = 64
topk = 64
suffix-len = 8

[grid]
seed = {list(range(n))}
""")
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()

    import ray

    from suffix_analysis.sweep import load_sweep, run_sweep
    from suffix_analysis.sweep.jobs import run_job

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_model(tmp / "model", args.layers, args.width)
        spec = load_sweep(sweep_file(tmp, tmp / "model", args.n, args.steps))
        run_job(spec.jobs[0].to_dict(), str(tmp / "warm"), threads=1)  # imports, first-call costs
        t0 = time.perf_counter()
        one = run_job(spec.jobs[0].to_dict(), str(tmp / "alone"), threads=1)
        t_one = time.perf_counter() - t0
        assert one["status"] == "ok", one
        t0 = time.perf_counter()
        seq = run_sweep(load_sweep(spec.source, out=str(tmp / "sequential")), local=True, figures=False)
        t_seq = time.perf_counter() - t0
        assert (seq["status"] == "ok").all()
        t0 = time.perf_counter()
        df = run_sweep(spec, workers=args.workers, figures=False)
        t_ray = time.perf_counter() - t0
        ray.shutdown()
        assert (df["status"] == "ok").all(), df[["job", "status", "error"]]
        print(f"model        Llama {args.layers} layers x {args.width}, attack gcg {args.steps} steps, width 64, 1 thread")
        print(f"one job      {t_one:8.1f} s (in process)")
        print(f"N={args.n} in turn  {t_seq:8.1f} s (run_sweep --local, in this process)")
        print(f"N={args.n} on K={args.workers} {t_ray:8.1f} s (run_sweep on a local Ray cluster, start-up included)")
        print(f"per job      {df['seconds'].min():.1f} .. {df['seconds'].max():.1f} s on the Ray workers")
        print(f"ratio        {t_ray / t_one:8.2f} x one job   (ideal N/K = {args.n / args.workers:.2f}); "
              f"in turn {t_seq / t_one:.2f} x; Ray speed-up over in turn {t_seq / t_ray:.2f} x")


if __name__ == "__main__":
    main()
