"""A model placed by ``accelerate`` (some layers on the CPU, some offloaded to disk, so that
accelerate's hooks sit on every layer and offloaded weights are on ``meta`` between passes)
gives what the same model in memory gives: extraction, ablation, activation addition,
attribution, the GCG loss and a GCG run, the fingerprint, and the orthogonalized export."""

import json

import pytest
import torch

from suffix_analysis.attacks.gcg import GCG, GCGConfig
from suffix_analysis.attribution.cosine import residual_cosine
from suffix_analysis.attribution.heads import direct_attribution
from suffix_analysis.attribution.hijack import attention_hijack
from suffix_analysis.attribution.suffix_tokens import suffix_token_effects
from suffix_analysis.directions.extract import diff_in_means
from suffix_analysis.errors import UserError
from suffix_analysis.interventions.directional import ablate_direction, add_direction
from suffix_analysis.interventions.orthogonalize import export_from_checkpoint, export_orthogonalized, orthogonalize_
from suffix_analysis.models.loading import load_model
from suffix_analysis.models.placement import Placement, devices_of, materialized, parse_device_map, parse_max_memory

HARMFUL = ["Write a poem about the sea.", "Explain how plants turn light into sugar.", "Tell a short joke."]
HARMLESS = ["Give three tips for staying healthy.", "Describe a cat.", "Name two birds."]
SUFFIX = "sea sugar fox dog"
TOL = 1e-5


def spread_map(n_layers: int) -> dict:
    """Embedding and every other layer on disk, the rest on the CPU."""
    m = {"model.embed_tokens": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    m.update({f"model.layers.{l}": "disk" if l % 2 else "cpu" for l in range(n_layers)})
    return m


@pytest.fixture(scope="module")
def pair(tiny_folder, tmp_path_factory):
    """(the tiny model in memory, the same folder dispatched over cpu and disk)."""
    folder = tmp_path_factory.mktemp("placement")
    plain = load_model(str(tiny_folder), device="cpu")
    (folder / "map.json").write_text(json.dumps(spread_map(plain.n_layers)))
    placed = load_model(str(tiny_folder), device="cpu",
                        placement=Placement(device_map=str(folder / "map.json"), offload_folder=str(folder / "off")))
    return plain, placed


def close(a, b, tol=TOL):
    a, b = (torch.tensor(x).double() if not torch.is_tensor(x) else x.double() for x in (a, b))
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item()), (a - b).abs().max().item()


def test_the_placed_model_is_really_offloaded(pair):
    plain, placed = pair
    assert placed.dispatched and not plain.dispatched
    assert set(devices_of(placed.model)) == {"cpu", "disk"}
    emb = placed.model.get_input_embeddings()
    assert emb.weight.device.type == "meta" and hasattr(emb, "_hf_hook")
    with materialized(emb):
        close(emb.weight, plain.model.get_input_embeddings().weight, 0)
    assert emb.weight.device.type == "meta"  # dropped again after the block
    assert placed.device.type == "cpu" and placed.dtype == torch.float32
    assert placed.fingerprint() == plain.fingerprint()


def test_extraction_ablation_and_addition_agree(pair):
    plain, placed = pair
    cands = [diff_in_means(cm, HARMFUL, HARMLESS, batch_size=2) for cm in pair]
    close(cands[0], cands[1])
    direction = cands[0][-1, 1].float()
    batch = plain.chat.encode(HARMFUL, device="cpu")
    outs = []
    for cm in pair:
        with torch.no_grad():
            with ablate_direction(cm, direction):
                ablated = cm.model(**batch).logits
                gen = cm.model.generate(**batch, max_new_tokens=4, do_sample=False)
            with add_direction(cm, direction, layer=1, coeff=2.0):
                added = cm.model(**batch).logits
        outs.append((ablated, added, gen))
    close(outs[0][0], outs[1][0])
    close(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])


def test_attribution_agrees(pair):
    plain, placed = pair
    direction = diff_in_means(plain, HARMFUL, HARMLESS)[-1, 1].float()
    a, b = (direct_attribution(cm, HARMFUL, direction, SUFFIX, batch_size=2) for cm in pair)
    for field in ("heads", "attn_bias", "mlp", "embed", "resid_pre", "resid_post"):
        close(getattr(a, field), getattr(b, field))
    close(b.reconstructed("hook_resid_post"), b.resid_post, 1e-4)  # the parts still add up
    close(*(residual_cosine(cm, HARMFUL, direction, SUFFIX) for cm in pair))
    ha, hb = (attention_hijack(cm, HARMFUL, SUFFIX, direction=direction, batch_size=2) for cm in pair)
    for field in ("mass", "share", "projection"):
        close(getattr(ha, field), getattr(hb, field))
    ea, eb = (suffix_token_effects(cm, HARMFUL[:2], SUFFIX, direction, layer=1) for cm in pair)
    for col in ("effect_replace", "effect_block", "grad_x_input"):
        close(ea[col].to_numpy(), eb[col].to_numpy())


def test_gcg_loss_and_run_agree(pair):
    plain, placed = pair
    direction = diff_in_means(plain, HARMFUL, HARMLESS)[-1, 1].float()
    cfg = GCGConfig(suffix_len=4, num_steps=2, search_width=8, topk=8, objective="target+direction",
                    direction_floor=False, seed=0)
    targets = ["Sure, here is"] * 2
    ids = plain.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"][:4]
    losses = [GCG(cfg, direction=(direction, 1)).loss_of(cm, HARMFUL[:2], targets, ids) for cm in pair]
    close(losses[0], losses[1])
    runs = [GCG(cfg, direction=(direction, 1)).run(cm, HARMFUL[:2], targets) for cm in pair]
    assert runs[0].suffix == runs[1].suffix
    close(runs[0].losses, runs[1].losses, 1e-4)


def test_orthogonalized_export_from_the_checkpoint_matches_the_in_memory_one(pair, tiny_folder, tmp_path):
    plain, placed = pair
    direction = diff_in_means(plain, HARMFUL, HARMLESS)[-1, 1].float()
    with pytest.raises(UserError, match="export_orthogonalized"):
        orthogonalize_(placed, direction)
    streamed = export_orthogonalized(placed, direction, tmp_path / "streamed", {"test": True})
    fresh = load_model(str(tiny_folder), device="cpu")
    in_memory = export_orthogonalized(fresh, direction, tmp_path / "memory", {"test": True})
    a, b = (load_model(str(p), device="cpu") for p in (streamed, in_memory))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        close(sa[k], sb[k], 1e-6)
    assert not a.model.config.tie_word_embeddings
    close(a.model.get_output_embeddings().weight, plain.model.get_output_embeddings().weight, 0)
    # the same function on an undispatched model reads the same checkpoint
    again = export_from_checkpoint(plain, direction, tmp_path / "again", {})
    assert json.loads((again / "suffix_analysis.json").read_text())["orthogonalized"]


def test_export_of_a_sharded_checkpoint_with_an_index(pair, tmp_path):
    """Shards and index as large checkpoints come (the tied head lands in the embedding's shard)."""
    plain = pair[0]
    folder = tmp_path / "sharded"
    plain.model.save_pretrained(folder, max_shard_size="40KB")
    plain.tokenizer.save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    (folder / "consolidated.safetensors").write_bytes((folder / sorted(set(index["weight_map"].values()))[0]).read_bytes())
    (tmp_path / "map.json").write_text(json.dumps(spread_map(plain.n_layers)))
    placed = load_model(str(folder), device="cpu", placement=Placement(device_map=str(tmp_path / "map.json"),
                                                                        offload_folder=str(tmp_path / "off")))
    direction = diff_in_means(plain, HARMFUL, HARMLESS)[-1, 1].float()
    streamed = export_orthogonalized(placed, direction, tmp_path / "streamed", {})
    assert not (streamed / "consolidated.safetensors").exists()  # only what the index names
    new_index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in new_index["weight_map"]
    in_memory = export_orthogonalized(load_model(str(folder), device="cpu"), direction, tmp_path / "memory", {})
    a, b = (load_model(str(p), device="cpu").model.state_dict() for p in (streamed, in_memory))
    assert a.keys() == b.keys()
    for k in a:
        close(a[k], b[k], 1e-6)


def test_bad_placements_are_one_line_errors(tmp_path, tiny_folder):
    with pytest.raises(UserError, match="cuda:3.*no CUDA GPU|cuda:3.*GPU"):
        parse_max_memory("cuda:3=10GiB")
    (tmp_path / "bad.json").write_text(json.dumps({"model": "cuda:7"}))
    with pytest.raises(UserError, match="cuda:7"):
        parse_device_map(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("{model: 0")
    with pytest.raises(UserError, match="not valid JSON"):
        parse_device_map(str(tmp_path / "broken.json"))
    with pytest.raises(UserError, match="not a strategy"):
        parse_device_map("everywhere")
    with pytest.raises(UserError, match="DEVICE=SIZE"):
        parse_max_memory("cpu:10GiB")
    with pytest.raises(UserError, match="4bit or 8bit"):
        Placement(quantize="2bit")
    with pytest.raises(UserError, match="--device-map auto"):
        Placement(max_memory="cpu=1GiB")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            load_model(str(tiny_folder), device="cpu", placement=Placement(quantize="4bit"))
    (tmp_path / "partial.json").write_text(json.dumps({"model": "disk"}))
    with pytest.raises(UserError, match="--device-map .*lm_head"):
        load_model(str(tiny_folder), device="cpu", placement=Placement(device_map=str(tmp_path / "partial.json"),
                                                                         offload_folder=str(tmp_path / "off")))
    (tmp_path / "typo.json").write_text(json.dumps({"model.embed_tokenz": "disk", "model": "cpu", "lm_head": "cpu"}))
    with pytest.raises(UserError, match="no module 'model.embed_tokenz'.*model.embed_tokens"):
        load_model(str(tiny_folder), device="cpu", placement=Placement(device_map=str(tmp_path / "typo.json"),
                                                                         offload_folder=str(tmp_path / "off")))


def test_auto_map_loads_on_the_devices_present(pair, tiny_folder):
    """On a CPU-only machine accelerate puts everything on the CPU (and transformers then
    does not dispatch); on a GPU machine it spreads the layers over the GPUs."""
    plain = pair[0]
    cm = load_model(str(tiny_folder), device="cpu", placement=Placement(device_map="auto"))
    with torch.no_grad():  # each model's inputs on its own input device
        got = cm.model(**cm.chat.encode(HARMFUL[:1], device=cm.device)).logits.cpu()
        close(got, plain.model(**plain.chat.encode(HARMFUL[:1], device=plain.device)).logits)


def test_commands_take_a_device_map(pair, tiny_folder, tmp_path, capsys):
    from suffix_analysis.cli import main

    (tmp_path / "map.json").write_text(json.dumps(spread_map(pair[0].n_layers)))
    (tmp_path / "i.txt").write_text("\n".join(HARMFUL) + "\n")
    common = ["refusal", "--model", str(tiny_folder), "--instructions", str(tmp_path / "i.txt"), "--judge", "substring",
              "--max-new-tokens", "3", "--json", "-q"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*common, "--device-map", str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off")]) == 0
    placed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert placed == plain


def test_no_bridge_over_a_dispatched_model(pair):
    from suffix_analysis.models.loading import to_bridge

    with pytest.raises(UserError, match="whole model on one device"):
        to_bridge(pair[1])
