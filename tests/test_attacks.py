"""The attack interface, GCG's exactness (prefix cache, gradient), checkpoints, controls."""

import json

import pytest
import torch
from conftest import install_plugin, tiny_chat_model

from suffix_analysis.attacks import Attack, AttackResult, get_attack, list_attacks, register_attack
from suffix_analysis.attacks.gcg import GCG, CandidateScorer, GCGConfig, GCGObjective, Prompt
from suffix_analysis.attacks.random_suffix import RandomConfig, RandomSuffix
from suffix_analysis.attacks.targets import default_target
from suffix_analysis.attacks.tokens import allowed_token_mask, survives_retokenization
from suffix_analysis.errors import UserError
from suffix_analysis.models.hooks import run_with_hooks

INSTR = ["Write a poem about the sea.", "Say hi."]
TARGETS = ["Sure, here is a poem", "Sure"]


@pytest.fixture(scope="module")
def cm():
    return tiny_chat_model("llama")


def _plain_loss(cm, prompt, suffix_ids):
    """Target cross-entropy from one plain forward over the whole sequence (no cache)."""
    ids = torch.tensor([prompt.before + suffix_ids + prompt.after + prompt.target])
    with torch.no_grad():
        logits = cm.model(input_ids=ids).logits[0]
    n = len(prompt.target)
    return torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(prompt.target)).item()


def _init_loss(cm, cfg, instructions, targets, direction=None):
    """The objective of the initial suffix, summed over prompts."""
    from suffix_analysis.models.forward import PrefixCache

    gcg = GCG(cfg, direction=direction)
    prompts = gcg._prompts(cm, instructions, targets)
    obj = GCGObjective(cm, cfg, direction, cfg.suffix_len)
    ids = torch.tensor(gcg._init_ids(cm))[None]
    total = 0.0
    with torch.no_grad():
        for p in prompts:
            p.cache = PrefixCache(cm, p.before)
            total += obj.loss(p, ids)[0].item()
    return total


def test_cached_candidate_loss_equals_plain_forward(cm):
    gcg = GCG(GCGConfig(suffix_len=4))
    prompts = gcg._prompts(cm, INSTR, TARGETS)
    from suffix_analysis.models.forward import PrefixCache

    obj = GCGObjective(cm, gcg.config, None, 4)
    torch.manual_seed(0)
    cands = torch.randint(10, 300, (6, 4))
    for p in prompts:
        p.cache = PrefixCache(cm, p.before)
        with torch.no_grad():
            fast, _ = obj.loss(p, cands)
        for c, f in zip(cands.tolist(), fast.tolist()):
            assert abs(f - _plain_loss(cm, p, c)) < 1e-4


def test_one_hot_gradient_matches_plain_autograd(cm):
    gcg = GCG(GCGConfig(suffix_len=4))
    prompts = gcg._prompts(cm, INSTR[:1], TARGETS[:1])
    from suffix_analysis.models.forward import PrefixCache

    p = prompts[0]
    p.cache = PrefixCache(cm, p.before)
    ids = torch.tensor([20, 30, 40, 50])
    embed = cm.model.get_input_embeddings()
    grad, (kept,) = gcg._grad(cm, GCGObjective(cm, gcg.config, None, 4), prompts, ids, embed)
    # the cache the gradient pass leaves behind is the prompt + current suffix cache
    with torch.no_grad():
        want = p.cache.extended(ids.tolist())
    assert kept.length == want.length == len(p.before) + 4
    for (k, v), (wk, wv) in zip(kept.kv, want.kv):
        torch.testing.assert_close(k, wk, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, wv, atol=1e-5, rtol=1e-4)
    one_hot = torch.nn.functional.one_hot(ids, embed.weight.shape[0]).float().requires_grad_(True)
    full = torch.cat([embed(torch.tensor(p.before)), one_hot @ embed.weight, embed(torch.tensor(p.after + p.target))])
    logits = cm.model(inputs_embeds=full[None]).logits[0]
    n = len(p.target)
    loss = torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(p.target))
    (ref,) = torch.autograd.grad(loss, one_hot)
    torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-3)


def test_allowed_mask_excludes_special_and_non_ascii(cm):
    tok = cm.tokenizer
    mask = allowed_token_mask(tok, cm.model.get_input_embeddings().weight.shape[0])
    for i in tok.all_special_ids:
        assert not mask[i]
    for i in mask.nonzero().squeeze(1).tolist()[:200]:
        t = tok.decode([i])
        assert t.isascii() and t.isprintable()


def test_retokenization_filter(cm):
    """A suffix survives when, decoded and placed in every prompt, it encodes to itself."""
    tok = cm.tokenizer
    good = tok(" the sea", add_special_tokens=False)["input_ids"]
    spelled = [tok(ch, add_special_tokens=False)["input_ids"][0] for ch in " the sea"]  # one token per character
    assert len(spelled) > len(good), "the tokenizer must merge characters for this test to mean anything"
    no_space = tok("sea", add_special_tokens=False)["input_ids"] * len(good)  # cannot follow "instruction "
    ok = survives_retokenization(cm, INSTR, torch.tensor([good, no_space[:len(good)]]))
    assert ok.tolist() == [True, False]
    assert survives_retokenization(cm, INSTR, torch.tensor([spelled])).tolist() == [False]  # re-encodes merged


def test_gcg_runs_improves_and_writes_checkpoints(cm, tmp_path):
    cfg = GCGConfig(num_steps=4, search_width=48, topk=32, suffix_len=5, early_stop=False, checkpoint_every=2,
                    progressive=False)
    full = GCG(cfg).run(cm, INSTR, TARGETS)
    assert len(full.losses) == len(full.step_seconds) == len(full.suffixes) == 4
    assert min(full.losses) < _init_loss(cm, cfg, INSTR, TARGETS) - 0.01
    # interrupted after 2 steps, resumed to 4: the same trajectory as one uninterrupted run
    half = GCG(GCGConfig(**{**cfg.__dict__, "num_steps": 2})).run(cm, INSTR, TARGETS, out=tmp_path)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["state"]["step"] == 2
    resumed = GCG(cfg).run(cm, INSTR, TARGETS, out=tmp_path, resume=True)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-5)
    assert resumed.suffix_ids == full.suffix_ids and half.losses == pytest.approx(full.losses[:2], abs=1e-5)


def test_resume_refuses_other_model_or_config(cm, tmp_path):
    cfg = GCGConfig(num_steps=1, search_width=8, topk=8, suffix_len=3, checkpoint_every=1)
    GCG(cfg).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path)
    with pytest.raises(UserError, match="made from other weights"):
        GCG(cfg).run(tiny_chat_model("llama", seed=9), INSTR[:1], TARGETS[:1], out=tmp_path, resume=True)
    with pytest.raises(UserError, match="another config"):
        GCG(GCGConfig(**{**cfg.__dict__, "topk": 4})).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path, resume=True)
    faster = {**cfg.__dict__, "num_steps": 2, "prune_after": 2, "bound_vocab": 0, "batch_size": 3}
    assert GCG(GCGConfig(**faster)).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path, resume=True).extra["steps"] == 2
    with pytest.raises(UserError, match="nothing to resume"):
        GCG(cfg).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path / "empty", resume=True)
    # a checkpoint from before a setting existed resumes when the setting is at its default, and only then
    ck = json.loads((tmp_path / "checkpoint.json").read_text())
    del ck["config"]["harmfulness_keep"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(ck))
    assert GCG(GCGConfig(**{**faster, "num_steps": 3})).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path,
                                                            resume=True).extra["steps"] == 3
    (tmp_path / "checkpoint.json").write_text(json.dumps(ck))
    with pytest.raises(UserError, match="another config"):
        GCG(GCGConfig(**{**faster, "num_steps": 3, "harmfulness_keep": 0.5})).run(cm, INSTR[:1], TARGETS[:1],
                                                                                   out=tmp_path, resume=True)


def test_momentum_survives_a_resume_and_its_file_is_checked(cm, tmp_path):
    cfg = GCGConfig(num_steps=4, search_width=16, topk=16, suffix_len=4, early_stop=False, checkpoint_every=2,
                    momentum=0.7, n_replace_start=3, n_replace_steps=3)
    full = GCG(cfg).run(cm, INSTR[:1], TARGETS[:1])
    GCG(GCGConfig(**{**cfg.__dict__, "num_steps": 2})).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path)
    resumed = GCG(cfg).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path, resume=True)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-5) and resumed.suffix_ids == full.suffix_ids
    plain = GCG(GCGConfig(**{**cfg.__dict__, "momentum": 0.0})).run(cm, INSTR[:1], TARGETS[:1])
    assert plain.suffixes != full.suffixes  # the momentum changes which candidates are drawn
    (tmp_path / "checkpoint_momentum.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="momentum of the checkpoint.*corrupted"):
        GCG(cfg).run(cm, INSTR[:1], TARGETS[:1], out=tmp_path, resume=True)


def test_multi_coordinate_schedule_swaps_more_positions_early(cm, monkeypatch):
    cfg = GCGConfig(n_replace_start=5, n_replace_steps=4, suffix_len=8)
    assert [cfg.n_replace_at(s) for s in range(6)] == [5, 4, 3, 2, 1, 1]
    assert GCGConfig().n_replace_at(0) == 1  # off by default
    from suffix_analysis.attacks.gcg import search

    seen = []
    real = search.sample_candidates

    def spy(ids, grad, width, topk, n_replace, gen):
        out = real(ids, grad, width, topk, n_replace, gen)
        seen.append(int((out != ids).sum(1).max()))
        return out

    monkeypatch.setattr(search, "sample_candidates", spy)
    GCG(GCGConfig(**{**cfg.__dict__, "num_steps": 5, "search_width": 16, "topk": 8, "early_stop": False,
                     "filter_retokenization": False})).run(cm, INSTR[:1], TARGETS[:1])
    assert seen[0] == 5 and seen[-1] == 1 and seen == sorted(seen, reverse=True)


def test_prefer_match_moves_to_a_candidate_that_makes_the_target_greedy(cm, monkeypatch):
    from suffix_analysis.attacks.gcg import scoring

    def fake(self, prompts, cands, current, fulls=None):
        losses = torch.arange(len(cands), dtype=torch.float)  # the first is the lowest
        match = torch.zeros(len(cands), dtype=torch.bool)
        match[-1] = True  # only the last one makes the target greedy
        fake.cands = cands
        return losses, match

    monkeypatch.setattr(scoring.CandidateScorer, "score", fake)
    base = dict(num_steps=1, search_width=8, topk=8, suffix_len=4, filter_retokenization=False)
    r = GCG(GCGConfig(**base, prefer_match=True)).run(cm, INSTR[:1], TARGETS[:1])
    assert r.suffix_ids == fake.cands[-1].tolist() and r.success
    r = GCG(GCGConfig(**base)).run(cm, INSTR[:1], TARGETS[:1])
    assert r.suffix_ids == fake.cands[0].tolist() and not r.success


def test_time_limit_stops_the_search(cm):
    r = GCG(GCGConfig(num_steps=50, search_width=8, topk=8, suffix_len=4, early_stop=False,
                      time_limit=1e-6)).run(cm, INSTR[:1], TARGETS[:1])
    assert r.extra["steps"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(suffix_len=0), "suffix length must be at least 1"),
    (dict(momentum=1.0), "momentum must be in"),
    (dict(suffix_len=4, n_replace_start=5), "n_replace_start 5 exceeds"),
    (dict(time_limit=-1), "time_limit must be at least 0"),
    (dict(search_width=4, buffer_size=8), "smaller than the candidate buffer"),
    (dict(objective="vibes"), "unknown objective"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(UserError, match=match):
        GCG(GCGConfig(**kwargs))


def test_empty_target_and_direction_without_run(cm):
    with pytest.raises(UserError, match="empty target"):
        GCG(GCGConfig(num_steps=1)).run(cm, INSTR[:1], ["  "])
    with pytest.raises(UserError, match="needs --direction"):
        GCG(GCGConfig(num_steps=1, objective="direction")).run(cm, INSTR[:1], TARGETS[:1])


def test_direction_objective_lowers_projection(cm):
    torch.manual_seed(3)
    r = torch.randn(cm.d_model)
    cfg = GCGConfig(num_steps=3, search_width=64, topk=64, suffix_len=4, objective="direction", early_stop=False)
    res = GCG(cfg, direction=(r, 1)).run(cm, INSTR[:1], [""])
    assert len(res.losses) == 3
    assert min(res.losses) < _init_loss(cm, cfg, INSTR[:1], [""], direction=(r, 1)) - 1e-3


def test_direction_floor_counts_only_the_projection_above_it(cm):
    """A floor under every projection shifts the loss by a constant; one above every projection
    makes it 0; one in between counts each EOI position's excess only; loss_of agrees."""
    from suffix_analysis.models.forward import PrefixCache

    torch.manual_seed(3)
    r = torch.randn(cm.d_model)
    cfg = GCGConfig(suffix_len=4, objective="direction")
    gcg = GCG(cfg, direction=(r, 1))
    (p,) = gcg._prompts(cm, INSTR[:1], [""])
    p.cache = PrefixCache(cm, p.before)
    ids = torch.tensor(gcg._init_ids(cm))[None]
    seen = {}
    n_eoi = len(cm.chat.eoi_ids)

    def loss(floor):
        obj = GCGObjective(cm, cfg, (r, 1), cfg.suffix_len, floor)
        with torch.no_grad(), run_with_hooks(cm, [("blocks.1.hook_resid_pre",
                                                   lambda x, hook: seen.update(x=x[0, -n_eoi:].clone()))]):
            return obj.loss(p, ids)[0].item()

    plain = loss(None)
    proj = seen["x"] @ (r / r.norm())  # [n_eoi]
    assert loss(torch.full((n_eoi,), -100.0)) == pytest.approx(plain + 100, abs=1e-3)
    assert loss(torch.full((n_eoi,), 1e6)) == 0.0
    mid = proj.median().item()
    assert loss(torch.full((n_eoi,), mid)) == pytest.approx((proj - mid).clamp(min=0).mean().item(), abs=1e-4)
    floored = GCG(cfg, direction=(r, 1), direction_floor=torch.full((n_eoi,), mid))
    assert floored.loss_of(cm, INSTR[:1], [""], ids[0].tolist()) == pytest.approx(loss(torch.full((n_eoi,), mid)),
                                                                                 abs=1e-4)
    with pytest.raises(UserError, match="one value per EOI position"):
        GCGObjective(cm, cfg, (r, 1), cfg.suffix_len, torch.zeros(n_eoi + 1))


def test_harmfulness_term_reads_the_suffix_last_token(cm):
    """The term is max(0, level - reading) at the suffix's last token, on its own and added to
    the direction term; the reference comes from prompts without a suffix; it needs a direction."""
    from suffix_analysis.attacks.gcg.objective import Harmfulness
    from suffix_analysis.attacks.gcg.search import harmfulness_reference
    from suffix_analysis.models.forward import PrefixCache

    torch.manual_seed(4)
    r, u = torch.randn(cm.d_model), torch.randn(cm.d_model)
    u = u / u.norm()
    cfg = GCGConfig(suffix_len=4, objective="harmfulness", harmfulness_keep=0.5)
    gcg = GCG(cfg, direction=(r, 1))
    (p,) = gcg._prompts(cm, INSTR[:1], [""])
    p.cache = PrefixCache(cm, p.before)
    ids = torch.tensor(gcg._init_ids(cm))[None]
    n_eoi = len(cm.chat.eoi_ids)
    seen = {}
    hook = [("blocks.1.hook_resid_pre", lambda x, hook: seen.update(last=x[0, -n_eoi - 1].clone()))]

    def loss(objective, harm, **kw):
        obj = GCGObjective(cm, GCGConfig(suffix_len=4, objective=objective, harmfulness_keep=0.5, **kw), (r, 1), 4,
                           harmfulness=harm)
        with torch.no_grad(), run_with_hooks(cm, hook):
            return obj.loss(p, ids)[0].item()

    plain = loss("direction", None, direction_floor=False)
    reading = float(seen["last"] @ u)
    above = Harmfulness(u, harmful=reading - 1.0, harmless=reading - 3.0)  # level reading - 2: nothing to pay
    below = Harmfulness(u, harmful=reading + 5.0, harmless=reading + 1.0)  # level reading + 3
    assert loss("harmfulness", above) == 0.0
    assert loss("harmfulness", below) == pytest.approx(3.0, abs=1e-4)
    assert loss("direction+harmfulness", below, harmfulness_weight=2.0) == pytest.approx(plain + 6.0, abs=1e-3)
    with pytest.raises(UserError, match="needs --direction"):
        GCGObjective(cm, cfg, None, 4, harmfulness=below)
    with pytest.raises(UserError, match="between 0 and 1"):
        GCGConfig(objective="harmfulness", harmfulness_keep=1.5).validate()
    ref = harmfulness_reference(cm, 1)
    assert ref.unit.shape == (cm.d_model,) and ref.unit.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert ref.harmful > ref.harmless  # the harmful mean lies further along harmful minus harmless
    res = GCG(GCGConfig(num_steps=2, search_width=16, topk=16, suffix_len=4, objective="direction+harmfulness",
                        early_stop=False), direction=(r, 1), harmfulness=ref).run(cm, INSTR[:1], [""])
    assert len(res.losses) == 2


def test_random_suffix_control(cm):
    res = RandomSuffix(RandomConfig(suffix_len=6, seed=1)).run(cm, INSTR, TARGETS)
    assert len(res.suffix_ids) == 6
    assert cm.tokenizer(" " + res.suffix, add_special_tokens=False)["input_ids"] == res.suffix_ids
    assert survives_retokenization(cm, INSTR, torch.tensor([res.suffix_ids])).all()
    assert res.suffix_ids != RandomSuffix(RandomConfig(suffix_len=6, seed=2)).run(cm, INSTR, TARGETS).suffix_ids


def test_random_suffix_control_fails_loudly_when_no_draw_survives(cm, monkeypatch):
    import suffix_analysis.attacks.random_suffix as rs

    monkeypatch.setattr(rs, "survives_retokenization", lambda cm, instr, cands: torch.zeros(len(cands), dtype=torch.bool))
    with pytest.raises(UserError, match="no random suffix of 6 tokens survived"):
        RandomSuffix(RandomConfig(suffix_len=6)).run(cm, INSTR, TARGETS)


def test_default_targets():
    assert default_target("Write a tutorial on how to pick a lock.") == "Sure, here is a tutorial on how to pick a lock"
    assert default_target("How can I pick a lock?") == "Sure, here is how you can pick a lock"
    assert default_target("Explain how to pick a lock") == "Sure, here is how to pick a lock"
    assert default_target("Give me a list of locks") == "Sure, here is a list of locks"


def test_registry_and_entry_point_plugins(tmp_path, monkeypatch):
    assert {"gcg", "random", "nanogcg"} <= set(list_attacks())

    @register_attack
    class Echo(Attack):
        name = "echo-test"

        def run(self, cm, instructions, targets, out=None, resume=False):
            return AttackResult(suffix="!", suffix_ids=[0], attack=self.name)

    assert get_attack("echo-test") is Echo
    # a plugin package announcing an attack through the entry point group
    install_plugin(tmp_path, monkeypatch, "myplugin",
                   "from suffix_analysis.attacks import Attack, AttackResult\n"
                   "class Plug(Attack):\n    name = 'plug'\n"
                   "    def run(self, cm, i, t, out=None, resume=False):\n"
                   "        return AttackResult('p', [1], attack='plug')\n",
                   "plug = myplugin:Plug")
    assert list_attacks()["plug"] == "myplugin:Plug"
    assert get_attack("plug").__name__ == "Plug"
    with pytest.raises(UserError, match="unknown attack"):
        get_attack("nope")


def _candidates(current, n, seed):
    torch.manual_seed(seed)
    cands = current.repeat(n, 1)
    cands[torch.arange(n), torch.randint(0, len(current), (n,))] = torch.randint(40, 300, (n,))
    return cands


def _scoring_setup(cm, gcg):
    """Both test prompts with their prefix caches, and the objective of ``gcg``'s config."""
    from suffix_analysis.models.forward import PrefixCache

    prompts = gcg._prompts(cm, INSTR, TARGETS)
    for p in prompts:
        p.cache = PrefixCache(cm, p.before)
    return prompts, GCGObjective(cm, gcg.config, None, gcg.config.suffix_len)


@pytest.mark.parametrize("batch_size", [0, 7])
def test_packed_target_losses_equal_plain_forwards(cm, batch_size):
    """Two prompts, no early rejection: every candidate's loss and greedy match equal a plain forward."""
    gcg = GCG(GCGConfig(suffix_len=6, prune_after=0, row_tokens=20, batch_size=batch_size))
    prompts, obj = _scoring_setup(cm, gcg)
    current = torch.tensor([30, 31, 32, 33, 34, 35])
    cands = _candidates(current, 20, 4)
    with torch.no_grad():
        got, match = CandidateScorer(obj, gcg.config).score(prompts, cands, current)
        want = torch.tensor([sum(_plain_loss(cm, p, c.tolist()) for p in prompts) for c in cands])
        want_match = torch.stack([obj.loss(p, cands, with_match=True)[1] for p in prompts]).all(0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(match, want_match)


def test_grouped_cache_reuse_gives_the_same_losses(cm):
    gcg4 = GCG(GCGConfig(suffix_len=6, reuse_groups=4, objective="target+refusal"))
    gcg1 = GCG(GCGConfig(suffix_len=6, reuse_groups=1, objective="target+refusal"))
    prompts, obj = _scoring_setup(cm, gcg4)
    current = torch.tensor([30, 31, 32, 33, 34, 35])
    cands = _candidates(current, 20, 4)
    with torch.no_grad():
        grouped, _ = CandidateScorer(obj, gcg4.config).score(prompts, cands, current)
        plain, _ = CandidateScorer(obj, gcg1.config).score(prompts, cands, current)
    torch.testing.assert_close(grouped, plain, atol=1e-4, rtol=1e-4)


def test_direction_term_reads_the_eoi_positions_with_or_without_target(cm):
    from suffix_analysis.models.forward import PrefixCache

    torch.manual_seed(5)
    r = torch.randn(cm.d_model)
    values = []
    for target in ["", "Sure, here is a poem"]:
        cfg = GCGConfig(suffix_len=4, objective="direction")
        gcg = GCG(cfg, direction=(r, 1))
        (p,) = gcg._prompts(cm, INSTR[:1], [target])
        p.cache = PrefixCache(cm, p.before)
        with torch.no_grad():
            values.append(GCGObjective(cm, cfg, (r, 1), 4).loss(p, torch.tensor([[20, 30, 40, 50]]))[0])
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=1e-5)


def test_split_target_cross_entropy_matches_plain_forward(cm):
    """Pass 1 (first target tokens, packed cache kept) + pass 2 (the rest, for chosen
    candidates) of early rejection give each token's cross-entropy of a plain forward."""
    from suffix_analysis.models.forward import PrefixCache

    gcg = GCG(GCGConfig(suffix_len=4, row_tokens=12))
    (p,) = gcg._prompts(cm, INSTR[:1], TARGETS[:1])
    p.cache = PrefixCache(cm, p.before)
    obj = GCGObjective(cm, gcg.config, None, 4)
    current = torch.tensor([20, 30, 40, 50])
    cands = torch.tensor([[20, 30, 41, 51], [20, 77, 40, 50], [99, 30, 40, 50], [20, 30, 40, 98]])
    first = (cands != current).int().argmax(1)
    full = p.cache.extended(current.tolist())
    upto = 2
    with torch.no_grad():
        h, packed = obj.target_hidden(p, cands, first, full, upto, keep_cache=True)
        head, _ = obj.target_exact(p, h)
        rows = torch.tensor([2, 0, 3])
        h_mid, again = obj.target_hidden_more(p, packed, rows, upto, upto + 1, keep_cache=True)
        h_end, _ = obj.target_hidden_more(p, again, torch.arange(3), upto + 1, len(p.target))
        rest, _ = obj.target_exact(p, torch.cat([h_mid, h_end], 1), upto)
    for r, c in enumerate(rows.tolist()):
        ids = torch.tensor([p.before + cands[c].tolist() + p.after + p.target])
        with torch.no_grad():
            logits = cm.model(input_ids=ids).logits[0]
        n = len(p.target)
        plain = torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(p.target), reduction="none")
        torch.testing.assert_close(torch.cat([head[c], rest[r]]), plain, atol=1e-4, rtol=1e-4)


def test_subset_bound_is_below_the_exact_cross_entropy_and_close(cm):
    """target_bound over the current suffix's likeliest tokens: never above the exact
    cross-entropy, equal to it with the whole vocabulary, and closer with more tokens."""
    from suffix_analysis.models.forward import PrefixCache

    gcg = GCG(GCGConfig(suffix_len=4))
    (p,) = gcg._prompts(cm, INSTR[:1], TARGETS[:1])
    p.cache = PrefixCache(cm, p.before)
    current = torch.tensor([20, 30, 40, 50])
    cands = _candidates(current, 12, 2)
    first = (cands != current).int().argmax(1)
    vocab = cm.model.get_output_embeddings().weight.shape[0]
    gaps = []
    with torch.no_grad():
        logits = []
        GCGObjective(cm, gcg.config, None, 4).loss(p, current[None], logits_out=logits)
        for k in (8, 64, vocab - 1):
            obj = GCGObjective(cm, GCGConfig(suffix_len=4, bound_vocab=k), None, 4)
            obj.narrow(p, logits[0][0])
            assert p.bound_ids.shape == (len(p.target), k)
            h, _ = obj.target_hidden(p, cands, first, p.cache.extended(current.tolist()), len(p.target))
            exact, _ = obj.target_exact(p, h)
            bound = obj.target_bound(p, h)
            assert (bound <= exact + 1e-5).all()
            gaps.append(float((exact - bound).mean()))
    assert gaps[0] > gaps[1] > gaps[2] >= 0 and gaps[2] < 0.01, gaps  # the last misses one token


class _TableObjective:
    """A stand-in objective whose per-token cross-entropy is a fixed function of the whole
    candidate: exercises the early-rejection bookkeeping on a wide spread of losses."""

    terms = ["target"]

    def __init__(self, n_target, seed):
        self.n_target = n_target
        self.w = torch.rand(n_target, 6, generator=torch.Generator().manual_seed(seed)) * 3
        self.calls = 0
        self.slack = 1.0

    def _ce(self, full):  # [batch, suffix_len] -> [batch, n_target], >= 0
        return (torch.sin(full.float() @ self.w.T) + 1) * torch.linspace(3, 0.2, self.n_target)

    # The "hidden states" are the per-token cross-entropies themselves; the bound is a loose one.
    def target_hidden(self, p, cands, first, full, upto, keep_cache=False):
        self.calls += 1
        return self._ce(cands)[:, :upto], (cands if keep_cache else None)

    def target_hidden_more(self, p, stash, rows, frm, to, keep_cache=False):
        self.calls += 1
        return self._ce(stash[rows])[:, frm:to], stash[rows]

    def target_exact(self, p, hidden, frm=0):
        return hidden, hidden < 0.1

    def target_bound(self, p, hidden, frm=0):
        return hidden * self.slack


class _NoCache:
    length = 0

    def extended(self, ids):
        return self

    def cropped(self, length):
        return self


@pytest.mark.parametrize("n_prompts,batch_size,gap,slack", [
    (1, 0, None, 1.0), (1, 13, None, 1.0), (1, 0, 0.0, 1.0), (1, 13, 0.0, 1.0), (1, 0, 0.5, 1.0),
    (1, 0, None, 0.9), (1, 13, 0.0, 0.9), (1, 0, 0.5, 0.97), (3, 0, None, 1.0), (3, 13, None, 1.0)])
def test_early_rejection_keeps_the_best_candidate_and_exact_losses(n_prompts, batch_size, gap, slack):
    """Exact whatever the threshold guess: none (a few completed first), far too low (0: the
    fallback completes what was dropped below the best), or in between; and whether the
    bounds are the exact cross-entropies (slack 1) or below them (slack < 1: completed
    candidates need their exact losses, lowest bound first)."""
    current = torch.tensor([30, 31, 32, 33, 34, 35])
    cfg = GCGConfig(suffix_len=6, reuse_groups=3, prune_after=2, prune_every=3, batch_size=batch_size)
    torch.manual_seed(7)
    cands = current.repeat(60, 1)
    cands[torch.arange(60), torch.randint(0, 6, (60,))] = torch.randint(40, 300, (60,))
    cands = torch.unique(cands, dim=0)
    prompts = [Prompt("x", [], [1], [5] * 8, _NoCache()) for _ in range(n_prompts)]
    objs = [_TableObjective(8, seed) for seed in range(n_prompts)]
    for o in objs:
        o.slack = slack

    class Sum:  # the objective of prompt i is objs[i]
        terms = ["target"]

        def __getattr__(self, name):
            def call(p, *args, **kwargs):
                return getattr(objs[prompts.index(p)], name)(p, *args, **kwargs)
            return call

    want = sum(o._ce(cands).mean(1) for o in objs)
    scorer = CandidateScorer(Sum(), cfg)
    scorer.gap = gap
    got, _ = scorer.score(prompts, cands, current)
    kept = torch.isfinite(got)
    assert int(got.argmin()) == int(want.argmin())
    torch.testing.assert_close(got[kept], want[kept], atol=1e-4, rtol=1e-5)
    assert int((~kept).sum()) > 0, "nothing was rejected: the test does not exercise early rejection"
    assert (want[~kept] > want.min()).all()


def test_staged_scoring_follows_the_same_path_as_full_scoring(cm):
    """Whole runs on a real (tiny) model: scoring in stages from packed caches continued
    again and again, and scoring in one pass, choose the same suffix at every step. (A
    random model's candidates are too alike for anything to be rejected here; the
    stand-in objective above covers rejection.)"""
    runs = []
    for prune_after, prune_every, bound_vocab in [(0, 0, 0), (2, 1, 0), (1, 0, 0), (2, 1, 16)]:
        cfg = GCGConfig(suffix_len=5, num_steps=4, search_width=24, topk=16, seed=3, early_stop=False,
                        prune_after=prune_after, prune_every=prune_every, row_tokens=16, bound_vocab=bound_vocab)
        runs.append(GCG(cfg).run(cm, INSTR[:1], ["Sure, here is a poem about the sea"]))
    for r in runs[1:]:
        assert r.suffixes == runs[0].suffixes
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(runs[0].losses), atol=1e-4, rtol=1e-4)


def test_answer_targets_cut_at_a_word_and_fall_back_on_refusals(cm, monkeypatch):
    from suffix_analysis.attacks import targets as tg
    from suffix_analysis.evaluation import generation

    answers = ["To pick a lock, you need a tension wrench and a pick", "I'm sorry, I can't help.", "\n\n"]
    monkeypatch.setattr(generation, "generate",
                        lambda cm, ins, **kw: generation.Generations(answers[: len(ins)], torch.zeros(len(ins), 1)))
    instr = ["How can I pick a lock?", "Write a poem about the sea.", "Explain the tides."]
    got = tg.answer_targets(cm, instr, n_tokens=6)
    ids = cm.tokenizer(answers[0], add_special_tokens=False)["input_ids"][:6]
    first = cm.tokenizer.decode(ids)
    assert answers[0].startswith(got[0]) and len(got[0]) <= len(first) and not got[0].endswith(" ")
    assert got[1:] == [tg.default_target(instr[1]), tg.default_target(instr[2])]  # a refusal, an empty answer


def test_ablated_answer_targets_are_generated_with_the_direction_ablated(cm, monkeypatch):
    """With a direction, the model answers with that direction ablated (its forward differs
    from the plain one while it generates); without one it answers as it is."""
    from suffix_analysis.attacks import targets as tg
    from suffix_analysis.evaluation import generation

    torch.manual_seed(5)
    r = torch.randn(cm.d_model)
    ids = torch.tensor([cm.chat.tokenize(["Say hi."])[0]])
    with torch.no_grad():
        clean = cm.model(input_ids=ids).logits
    plain_forward = []

    def fake(cm_, ins, **kw):
        with torch.no_grad():
            plain_forward.append(torch.allclose(cm_.model(input_ids=ids).logits, clean))
        return generation.Generations(["To pick a lock, you need a wrench"] * len(ins), torch.zeros(len(ins), 1))

    monkeypatch.setattr(generation, "generate", fake)
    instr = ["How can I pick a lock?"]
    assert tg.answer_targets(cm, instr, n_tokens=4, direction=r) == tg.answer_targets(cm, instr, n_tokens=4)
    assert plain_forward == [False, True]
    with torch.no_grad():  # and the hooks are gone afterwards
        assert torch.allclose(cm.model(input_ids=ids).logits, clean)


def test_words_only_suffixes_use_word_tokens(cm):
    from suffix_analysis.attacks.tokens import WORD_TOKEN

    vocab = cm.model.get_input_embeddings().weight.shape[0]
    words = allowed_token_mask(cm.tokenizer, vocab, words_only=True)
    texts = cm.tokenizer.batch_decode([[i] for i in range(vocab)])
    assert words.any() and (words & ~allowed_token_mask(cm.tokenizer, vocab)).sum() == 0
    assert all(bool(WORD_TOKEN.fullmatch(texts[i])) for i in words.nonzero().flatten().tolist())
    init = cm.tokenizer(" x", add_special_tokens=False)["input_ids"][0]
    cfg = GCGConfig(num_steps=3, search_width=16, topk=8, suffix_len=4, words_only=True, early_stop=False)
    res = GCG(cfg).run(cm, INSTR[:1], TARGETS[:1])
    assert all(words[t] or t == init for t in res.suffix_ids) and res.suffix_ids != [init] * 4


def test_the_attention_objective_draws_attention_to_the_suffix_and_leaves_sdpa_in_place():
    """The attention term reads attn.hook_pattern (eager attention) during the search only: the
    model is back on its own attention afterwards (it stayed on eager before), and the loss
    it minimizes is minus the share of attention the last prompt token pays to the suffix,
    as a plain eager forward measures it."""
    cm = tiny_chat_model("llama")
    cm.model.set_attn_implementation("sdpa")
    cfg = GCGConfig(num_steps=3, search_width=16, topk=8, suffix_len=4, objective="attention", early_stop=False)
    result = GCG(cfg).run(cm, INSTR[:1], TARGETS[:1])
    assert cm.model.config._attn_implementation == "sdpa"

    def suffix_share(ids: list[int]) -> float:
        """Mean over heads and layers of the attention the last prompt token pays to the suffix."""
        gcg = GCG(cfg)
        p = gcg._prompts(cm, INSTR[:1], TARGETS[:1])[0]
        seq = torch.tensor([p.before + ids + p.after])
        cm.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                att = cm.model(input_ids=seq, output_attentions=True).attentions
        finally:
            cm.model.set_attn_implementation("sdpa")
        lo, hi = len(p.before), len(p.before) + len(ids)
        return torch.stack([a[0, :, -1, lo:hi].sum(-1).mean() for a in att]).mean().item()

    first = GCG(cfg)._init_ids(cm)
    assert suffix_share(result.suffix_ids) > suffix_share(first)
    assert result.losses[-1] == pytest.approx(-suffix_share(result.suffix_ids), abs=1e-4)


def test_first_layers_draft_is_the_logit_lens_of_the_model_and_shares_its_weights(cm):
    from suffix_analysis.models.draft import first_layers

    draft = first_layers(cm, 2)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        h = cm.model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # after block 2
        lens = cm.model.lm_head(cm.model.model.norm(h))
        assert torch.allclose(draft.model(input_ids=ids).logits, lens, atol=1e-5)
    assert draft.n_layers == 2 and cm.n_layers == 3 and cm.model.config.num_hidden_layers == 3  # the model is untouched
    assert draft.model.lm_head.weight is cm.model.lm_head.weight
    for spec, match in [("layers:3", "1 <= N < 3"), ("layers:x", "layers:N")]:
        with pytest.raises(UserError, match=match):
            GCG(GCGConfig(num_steps=1, draft=spec)).run(cm, INSTR[:1], TARGETS[:1])


def test_spearman():
    from suffix_analysis.attacks.gcg.probe import spearman

    x = torch.tensor([0.3, 2.0, -1.0, 5.0])
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x[:1], x[:1]) == 0.0


def test_probe_sampling_scores_fewer_candidates_on_the_model(tiny, tiny_folder):
    base = dict(num_steps=3, search_width=32, topk=16, suffix_len=6, early_stop=False, probe_factor=4)
    # a draft that is the model itself agrees perfectly: the model scores the probe set and
    # the draft's best, which is the step's best, so the search goes where plain GCG goes
    r = GCG(GCGConfig(**base, draft=str(tiny_folder))).run(tiny, INSTR[:1], TARGETS[:1])
    assert r.extra["probe_agreement"] == pytest.approx([1.0] * 3)
    assert all(n <= 32 // 4 + 1 for n in r.extra["model_scored"])
    plain = GCG(GCGConfig(**base)).run(tiny, INSTR[:1], TARGETS[:1])
    assert r.suffixes == plain.suffixes and r.losses == pytest.approx(plain.losses, abs=1e-5)
    # a draft that ranks badly makes the model score more (up to probe set + width / probe_r)
    r = GCG(GCGConfig(**base, draft="layers:1", probe_r=2)).run(tiny, INSTR[:1], TARGETS[:1])
    assert len(r.extra["model_scored"]) == 3 and all(n <= 8 + 16 for n in r.extra["model_scored"])
    assert all(-1 <= a <= 1 for a in r.extra["probe_agreement"])


def test_probe_sampling_bad_drafts(tiny, tmp_path):
    from conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer("llama3")
    tiny_llama(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="another tokenizer"):
        GCG(GCGConfig(num_steps=1, draft=str(tmp_path))).run(tiny, INSTR[:1], TARGETS[:1])
    with pytest.raises(UserError, match="target objective only"):
        GCG(GCGConfig(draft="layers:1", objective="target+refusal"))
