"""Shipped assets: a LoRA delta on the real SmolLM2 GGUF packs, materializes into the cache once, and loads as the
same network as merging the adapter in memory; broken assets are refused with the file and field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import canvaslm
from canvaslm.checkpoints import hf
from canvaslm.errors import CheckpointError
from canvaslm.loading import assets, registry
from canvaslm.loading.registry import smollm2_gguf
from canvaslm.models.lora import LoRALinear, apply_lora, hf_module_names, merge_lora, save_adapter

CANVAS = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A fake finished LoRA run on smol-ar: random adapters, a trained self-conditioning block, the export's
    config; returns it with the merged network (rounded through bfloat16, as packing stores the deltas)."""
    run = tmp_path_factory.mktemp("run")
    network = canvaslm.load("smol-ar", device="cpu").network.to_diffusion(CANVAS)
    names = hf_module_names(network)
    torch.manual_seed(0)
    apply_lora(network, rank=2, alpha=4, targets=["q_proj", "down_proj"], modules_to_save=["self_conditioning"])
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad:
                p.copy_((torch.randn_like(p) * 0.02).to(torch.bfloat16).float())
    save_adapter(network, run / "adapter", rank=2, alpha=4, dropout=0.0, modules_to_save=["self_conditioning"],
                 base_model="smol-ar", hf_names=names)
    merge_lora(network)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps(network.config.to_hf()))
    (run / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "pad_token_id": 2}))
    return run, network.eval()


def test_pack_materialize_and_load_give_the_merged_network(run_dir, tmp_path, monkeypatch):
    run, merged = run_dir
    monkeypatch.setenv("CANVASLM_HOME", str(tmp_path / "home"))
    asset = assets.pack(run, tmp_path / "asset", "smol", "smol-ar", {"entropy_bound": 0.3}, {"steps": 1})
    files = {p.name for p in (asset / "adapter").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}
    meta = json.loads((asset / "asset.json").read_text())
    assert meta["model_config"] == {"canvas_length": CANVAS} and meta["base_sha256"] == assets.sha256(smollm2_gguf())
    assert meta["generation_config"]["entropy_bound"] == 0.3 and meta["training"] == {"steps": 1}

    lm = canvaslm.load(asset, device="cpu")
    built = list((tmp_path / "home" / "models").iterdir())
    assert len(built) == 1 and (built[0] / ".complete").is_file()
    assert lm.kind == "diffusion" and lm.network.canvas_length == CANVAS and lm.tokenizer is not None
    assert lm.diffusion_defaults.entropy_bound == 0.3
    ours, theirs = lm.network.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    assert not any(isinstance(m, LoRALinear) for m in lm.network.modules())

    stamp = (built[0] / "model.safetensors").stat().st_mtime_ns
    again = canvaslm.load(asset, device="cpu")  # second use: read from the cache, not rebuilt
    assert (built[0] / "model.safetensors").stat().st_mtime_ns == stamp
    out = again.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8, seed=0)
    assert out.forward_passes >= 1


def test_pack_refuses_runs_without_an_adapter_or_diffusion_config(run_dir, tmp_path):
    run, _ = run_dir
    with pytest.raises(CheckpointError, match="adapter"):
        assets.pack(tmp_path, tmp_path / "a", "smol", "smol-ar")
    with pytest.raises(CheckpointError, match="unknown base"):
        assets.pack(run, tmp_path / "a", "smol", "no-such-model")
    ar_only = tmp_path / "ar-run"
    (ar_only / "model").mkdir(parents=True)
    (ar_only / "adapter").symlink_to(run / "adapter")
    config = hf.read_config(run / "model")
    config.pop("canvas_length")
    (ar_only / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a block-diffusion model"):
        assets.pack(ar_only, tmp_path / "a", "smol", "smol-ar")


def _asset_copy(run: Path, tmp_path: Path) -> Path:
    return assets.pack(run, tmp_path / "asset", "smol", "smol-ar")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda a: a.update(format="other"), "format"),
    (lambda a: a.pop("base_sha256"), "base_sha256"),
    (lambda a: a.update(model_config={"canvas_length": 8, "hidden_size": 3}), "model_config"),
    (lambda a: a.update(base="gpt-9"), "unknown base model"),
    (lambda a: a.update(base_sha256="0" * 64), "not the one this asset was trained on"),
    (lambda a: a.update(generation_config={"entropy_bound": -1}), "bad sampling default"),
])
def test_broken_assets_name_the_field(run_dir, tmp_path, monkeypatch, edit, message):
    monkeypatch.setenv("CANVASLM_HOME", str(tmp_path / "home"))
    asset = _asset_copy(run_dir[0], tmp_path)
    meta = json.loads((asset / "asset.json").read_text())
    edit(meta)
    (asset / "asset.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as info:
        canvaslm.load(asset, device="cpu")
    assert "asset.json" in str(info.value) or "gguf" in str(info.value).lower()
    assert not list((tmp_path / "home").glob("models/*/.complete"))


def test_missing_adapter_file_and_bad_json(run_dir, tmp_path):
    asset = _asset_copy(run_dir[0], tmp_path)
    (asset / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        assets.read_asset(asset)
    (asset / "asset.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        assets.read_asset(asset)


def test_the_default_name_explains_when_its_asset_is_not_bundled(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "BUNDLED", tmp_path)
    with pytest.raises(CheckpointError, match="not bundled in this build"):
        canvaslm.load("smol", device="cpu")


def test_a_canvas_adapter_asset_keeps_the_parent_for_the_causal_pass(tmp_path, monkeypatch):
    """The default model's layout: the adapter acts in the canvas pass only, so the materialized model encodes
    prompts exactly as smol-ar does (and still decodes autoregressively as the parent)."""
    import dataclasses

    monkeypatch.setenv("CANVASLM_HOME", str(tmp_path / "home"))
    parent = canvaslm.load("smol-ar", device="cpu").network
    network = canvaslm.load("smol-ar", device="cpu").network.to_diffusion(CANVAS)
    network.config = dataclasses.replace(network.config, canvas_shift=True, mask_token_id=4, canvas_adapters=True)
    names = hf_module_names(network)
    torch.manual_seed(1)
    apply_lora(network, rank=2, alpha=4, targets=["q_proj", "down_proj"])
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad:
                p.copy_((torch.randn_like(p) * 0.02).to(torch.bfloat16).float())
    run = tmp_path / "run"
    save_adapter(network, run / "adapter", rank=2, alpha=4, dropout=0.0, base_model="smol-ar", hf_names=names)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps(network.config.to_hf()))
    asset = assets.pack(run, tmp_path / "asset", "smol", "smol-ar")
    assert json.loads((asset / "asset.json").read_text())["model_config"] == {
        "canvas_length": CANVAS, "canvas_shift": True, "mask_token_id": 4, "canvas_adapters": True}
    lm = canvaslm.load(asset, device="cpu")
    assert lm.network.config.canvas_adapters and lm.network.canvas_shift
    ids = torch.tensor([[1, 9690, 198, 504, 3209, 28]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        ours_cache, parent_cache = lm.network.new_cache(1), parent.new_cache(1)
        assert torch.equal(lm.network.encode(ids, ours_cache, valid), parent.encode(ids, parent_cache, valid))
        canvas = torch.full((1, CANVAS), 4)
        network.eval()
        expected = network.decode(canvas, parent_cache, None)  # the in-memory adapter on the parent's cache
        torch.testing.assert_close(lm.network.decode(canvas, ours_cache, None), expected, atol=1e-4, rtol=0)
