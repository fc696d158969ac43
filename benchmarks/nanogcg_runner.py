"""Runs nanoGCG inside its own environment (nanogcg 0.3.0 + the transformers it pins).

Called by bench_gcg.py as ``NANOGCG_PYTHON nanogcg_runner.py SPEC.json OUT.json``; not
imported by the suite. Prints nothing but what nanoGCG logs; writes per-step seconds and losses.
"""

import json
import sys
import time

import torch


def main():
    spec = json.loads(open(sys.argv[1]).read())
    import nanogcg
    import nanogcg.gcg as ngcg
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(spec["threads"])
    tok = PreTrainedTokenizerFast(tokenizer_file=spec["tokenizer_file"], **spec["special_tokens"])
    tok.chat_template = spec["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=getattr(torch, spec["dtype"])).eval()

    stamps = []
    original = ngcg.GCG.compute_token_gradient

    def timed(self, *a, **k):  # called once at the start of every step
        stamps.append(time.perf_counter())
        return original(self, *a, **k)

    ngcg.GCG.compute_token_gradient = timed
    c = spec["config"]
    cfg = nanogcg.GCGConfig(num_steps=c["num_steps"], optim_str_init=" ".join(["x"] * c["suffix_len"]),
                            search_width=c["search_width"], topk=c["topk"], n_replace=1, buffer_size=0,
                            allow_non_ascii=False, filter_ids=True, early_stop=False, use_prefix_cache=True,
                            seed=c["seed"], verbosity="WARNING")
    messages = [{"role": "user", "content": spec["instruction"] + " {optim_str}"}]
    result = nanogcg.run(model, tok, messages, spec["target"], cfg)
    end = time.perf_counter()
    stamps.append(end)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    json.dump({"losses": result.losses, "step_seconds": steps, "best_loss": result.best_loss,
               "best_string": result.best_string, "strings": result.strings}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
