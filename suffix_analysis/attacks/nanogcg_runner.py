"""Runs nanoGCG inside its own environment (nanogcg 0.3.0 + the transformers it pins).

A script, run by ``nanogcg_env.run_nanogcg`` as ``NANOGCG_PYTHON nanogcg_runner.py SPEC.json
OUT.json``; it imports nothing from the suite (whose transformers 5 code would not load
there). SPEC: the exported model (``model_dir``, ``tokenizer_file``, ``special_tokens``,
``chat_template``, ``dtype``, ``device``), ``instruction``, ``target``, ``threads``,
``gcg`` (nanogcg.GCGConfig's arguments) and optionally ``max_seconds`` (a time budget).
OUT: per-step losses, seconds and best strings, the best string and its token ids, and the
versions that ran. Its output is nanoGCG's own.
"""

import json
import sys
import time
from importlib.metadata import version

import torch


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import nanogcg
    import nanogcg.gcg as ngcg
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(spec["threads"])
    tok = PreTrainedTokenizerFast(tokenizer_file=spec["tokenizer_file"], **spec["special_tokens"])
    tok.chat_template = spec["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=getattr(torch, spec["dtype"]))
    model = model.to(spec["device"]).eval()

    stamps = []
    original = ngcg.GCG.compute_token_gradient

    limit = float(spec.get("max_seconds") or 0)

    def timed(self, *a, **k):  # nanoGCG calls it once at the start of every step
        stamps.append(time.perf_counter())
        if limit and stamps[-1] - stamps[0] >= limit:
            self.stop_flag = True  # a time budget, as the suite's time_limit: the step runs, then the loop ends
        return original(self, *a, **k)

    ngcg.GCG.compute_token_gradient = timed
    messages = [{"role": "user", "content": spec["instruction"].strip() + " {optim_str}"}]
    result = nanogcg.run(model, tok, messages, spec["target"], nanogcg.GCGConfig(**spec["gcg"]))
    stamps.append(time.perf_counter())
    with open(sys.argv[2], "w") as f:
        json.dump({"losses": result.losses, "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
                   "best_loss": result.best_loss, "best_string": result.best_string,
                   "best_ids": tok(result.best_string, add_special_tokens=False)["input_ids"],
                   "strings": result.strings,
                   "versions": {p: version(p) for p in ("nanogcg", "transformers", "torch")}}, f)


if __name__ == "__main__":
    main()
