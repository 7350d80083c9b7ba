"""HF-layout checkpoint directories: loading, saving, sharding, and a clear CanvasError for each bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from canvaslm.checkpoints import hf
from canvaslm.errors import CanvasError
from canvaslm.models import llama
from tests.reference import tiny_diffusion_gemma

LAYERS = ["sliding_attention", "full_attention"]
VOCAB = 128



@pytest.fixture(scope="module")
def reference():
    return tiny_diffusion_gemma(LAYERS, canvas_length=8, sliding_window=4, vocab_size=VOCAB, seed=5)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reference")
    reference.save_pretrained(path)
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


PROMPT = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
VALID = PROMPT != 0
CANVAS = torch.arange(10, 18).repeat(2, 1)


def our_logits(model) -> torch.Tensor:
    cache = model.new_cache(2)
    with torch.no_grad():
        model.encode(PROMPT, cache, VALID)
        return model.decode(CANVAS, cache)


def reference_logits(ref) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    n, c = PROMPT.shape[1], CANVAS.shape[1]
    with torch.no_grad():
        ref.model.encoder(input_ids=PROMPT, attention_mask=VALID, past_key_values=cache,
                          position_ids=torch.arange(n)[None])
        return ref(decoder_input_ids=CANVAS, past_key_values=cache,
                   decoder_attention_mask=F.pad(VALID, (0, c), value=True),
                   decoder_position_ids=torch.arange(n, n + c)[None]).logits


def test_load_matches_reference(reference, checkpoint):
    module, model = hf.load_model(checkpoint)
    assert module.__name__ == "canvaslm.models.diffusion_gemma" and model.kind == "diffusion"
    assert model.canvas_length == 8 and model.vocab_size == VOCAB
    torch.testing.assert_close(our_logits(model), reference_logits(reference), atol=1e-4, rtol=0)


def test_load_casts_floating_weights(checkpoint):
    _, model = hf.load_model(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.layers[0].encoder_scalar.dtype == torch.bfloat16


def test_loading_skips_random_init_and_the_compiler(checkpoint):
    """A model built to take a checkpoint's weights is built on the meta device without random init. `normal_` on
    meta (the embeddings' init) imports torch._dynamo, 2.5 s of every `canvaslm` start on a 2-core CPU; a fresh
    process that loads a DiffusionGemma directory and the GGUF parent must not import it."""
    code = ("import sys, canvaslm; [canvaslm.load(s) for s in sys.argv[1:]]; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint), "smol-ar"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    with torch.device("meta"):
        empty = llama.Model(llama.Config.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 8,
                                                  "intermediate_size": 16, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2}, "test"))
    assert empty.embed_tokens.weight.is_meta
    # built anywhere else, the embeddings keep nn.Embedding's init (a random model for tests and training)
    assert llama.Model(empty.config).embed_tokens.weight.std() > 0.5


@pytest.mark.parametrize("max_shard_bytes", [5 << 30, 20_000])
def test_save_load_round_trip(checkpoint, tmp_path, max_shard_bytes):
    _, model = hf.load_model(checkpoint)
    settings = {"max_denoising_steps": 16, "entropy_bound": 0.2, "t_min": 0.3}
    hf.save_model(model, tmp_path, generation_config=settings, max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    if max_shard_bytes < 1 << 20:
        assert len(shards) > 1 and (tmp_path / hf.INDEX).is_file() and not (tmp_path / hf.WEIGHTS).exists()
    else:
        assert not shards and (tmp_path / hf.WEIGHTS).is_file()
    _, again = hf.load_model(tmp_path)
    assert torch.equal(our_logits(again), our_logits(model))
    assert hf.load_generation_config(tmp_path) == settings
    raw = json.loads((tmp_path / hf.GENERATION_CONFIG).read_text())
    assert raw["sampler_config"] == {"entropy_bound": 0.2, "_cls_name": "EntropyBoundSamplerConfig"}


def test_transformers_loads_what_we_save(reference, checkpoint, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    _, model = hf.load_model(checkpoint)
    hf.save_model(model, tmp_path, max_shard_bytes=20_000)
    loaded, info = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, output_loading_info=True)
    text_missing = [k for k in info["missing_keys"] if "vision" not in k]
    assert not text_missing and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(reference_logits(loaded.eval()), reference_logits(reference), atol=1e-5, rtol=0)


def test_generation_config_is_flattened(tmp_path):
    (tmp_path / hf.GENERATION_CONFIG).write_text(json.dumps({
        "max_denoising_steps": 48, "t_min": None, "transformers_version": "5.23.0",
        "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"}}))
    assert hf.load_generation_config(tmp_path) == {"max_denoising_steps": 48, "entropy_bound": 0.1}
    (tmp_path / "bare").mkdir()
    assert hf.load_generation_config(tmp_path / "bare") == {}


# --- bad inputs: each raises a CanvasError naming the file (and the field or tensor) -------------------------


def expect_error(directory: Path, *needles: str) -> str:
    with pytest.raises(CanvasError) as e:
        hf.load_model(directory)
    message = str(e.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def write_header(path: Path, header: bytes, data: bytes = b"", declared: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nowhere", "nowhere", "does not exist")


def test_missing_config(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path).joinpath("config.json").unlink()
    expect_error(tmp_path, "config.json", "missing")


def test_invalid_config_json(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path).joinpath("config.json").write_text('{"model_type": ')
    expect_error(tmp_path, "config.json", "invalid JSON")


@pytest.mark.parametrize("model_type, problem", [(None, "model_type is missing"), ("gpt9", "unknown model_type")])
def test_bad_model_type(checkpoint, tmp_path, model_type, problem):
    copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("model_type") if model_type is None else config.update(model_type=model_type)
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = expect_error(tmp_path, "config.json", problem, "'model_type'")
    assert "diffusion_gemma" in message  # lists the supported ones


def test_bad_config_field(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, "config.json", "text_config.num_attention_heads", "expected int", "found str")


def test_no_weight_files(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path).joinpath("model.safetensors").unlink()
    expect_error(tmp_path, str(tmp_path), "no weight files", "model.safetensors")


def test_pickle_weights_are_refused(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path).joinpath("model.safetensors").rename(tmp_path / "pytorch_model.bin")
    expect_error(tmp_path, "pytorch_model.bin", "pickle weights are refused", "safetensors")


def test_header_length_beyond_file(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    write_header(tmp_path / "model.safetensors", b'{"a": 1}', declared=10_000)
    expect_error(tmp_path, "model.safetensors", "header length beyond the file")


def test_header_not_json(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    write_header(tmp_path / "model.safetensors", b"{not json at all")
    expect_error(tmp_path, "model.safetensors", "not valid JSON")


def test_truncated_data(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    expect_error(tmp_path, "model.safetensors", "data shorter than the header says")


def test_header_offsets_disagree_with_shape(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    write_header(tmp_path / "model.safetensors", header, bytes(8))
    expect_error(tmp_path, "model.safetensors", "'w'", "expected 16 bytes")


def sharded(checkpoint: Path, tmp_path: Path) -> Path:
    _, model = hf.load_model(checkpoint)
    hf.save_model(model, tmp_path, max_shard_bytes=20_000)
    return tmp_path


def test_index_points_to_missing_shard(checkpoint, tmp_path):
    sharded(checkpoint, tmp_path).joinpath("model-00002-of-00002.safetensors").unlink(missing_ok=True)
    for extra in sorted(tmp_path.glob("model-*.safetensors"))[1:]:
        extra.unlink()
    expect_error(tmp_path, hf.INDEX, "missing shard", "-of-")


def test_index_disagrees_with_shard(checkpoint, tmp_path):
    index_path = sharded(checkpoint, tmp_path) / hf.INDEX
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    expect_error(tmp_path, other, name, "not in this shard")


def test_tensor_shape_mismatch(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, "model.safetensors", "wrong shape", "mlp.gate_proj.weight", "(48, 32)", "(64, 32)")


def test_missing_and_unknown_tensors(checkpoint, tmp_path):
    from safetensors.torch import load_file

    copy_checkpoint(checkpoint, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.decoder.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    expect_error(tmp_path, "model.safetensors", "missing tensor", "model.decoder.norm.weight")
    tensors["model.decoder.norm.weight"] = torch.ones(32)
    tensors["model.decoder.extra.weight"] = torch.ones(3)
    save_file(tensors, tmp_path / "model.safetensors")
    expect_error(tmp_path, "model.safetensors", "unknown tensor", "model.decoder.extra.weight")
