"""lora.py: peft adapters attached, checked, saved in diffusers' format and loaded into the stock pipelines."""
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

import lora
from errors import UsageError

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
PROMPT = "a photo of a red castle"


def image(pipe):
    """A 64x64 image of PROMPT in 2 steps, seed 0, as a float array in [0, 1]."""
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def trained_adapter(kind, ckpt, folder, rank=4, alpha=8, seed=0):
    """An adapter saved by lora.save_lora whose B matrices are random (a trained adapter's are not zero)."""
    transformer = PIPELINES[kind].from_pretrained(ckpt).transformer
    lora.add_lora(transformer, lora.lora_config(transformer, rank, alpha))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return lora.save_lora(PIPELINES[kind], transformer, folder)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_adapter_loads_into_the_stock_pipeline_as_w_plus_scaled_ba_and_changes_the_image(tiny_ckpts, tmp_path, kind):
    path = trained_adapter(kind, tiny_ckpts[kind], tmp_path / "out", rank=4, alpha=8)
    assert path.name == "pytorch_lora_weights.safetensors"
    stored = lora.read_adapter_config(path)
    assert stored["r"] == 4 and stored["lora_alpha"] == 8
    assert set(stored["target_modules"]) == set(lora.DEFAULT_LORA_LAYERS[TRANSFORMERS[kind]])
    tensors = load_file(path)
    assert tensors and all(k.startswith("transformer.") and ".lora_" in k for k in tensors)

    base = PIPELINES[kind].from_pretrained(tiny_ckpts[kind])
    before = {name: p.detach().clone() for name, p in base.transformer.named_parameters()}
    plain = image(base)
    lora.load_lora(base, tmp_path / "out", lora_scale=0.5)  # a folder: its pytorch_lora_weights.safetensors
    after = dict(base.transformer.named_parameters())
    assert after.keys() == before.keys()  # fused: plain Linear layers again, no adapter left behind
    adapted = 0
    for name, weight in before.items():
        module = name.removesuffix(".weight")
        if f"transformer.{module}.lora_A.weight" in tensors:  # reference: W + scale * alpha / r * B A
            a, b = tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"]
            weight = weight + 0.5 * (8 / 4) * b @ a
            adapted += 1
        torch.testing.assert_close(after[name], weight, rtol=1e-5, atol=1e-6)
    assert adapted == len(tensors) // 2
    with_lora = image(base)
    assert np.abs(with_lora - plain).mean() > 1e-3, "the adapter did not change the image"

    # diffusers' own un-fused path (adapter layers, weight set by set_adapters) gives the same image.
    stock = PIPELINES[kind].from_pretrained(tiny_ckpts[kind])
    stock.load_lora_weights(str(path), adapter_name="x")
    stock.set_adapters(["x"], adapter_weights=[0.5])
    np.testing.assert_allclose(image(stock), with_lora, atol=1e-4)


def test_adapter_of_the_other_model_is_refused_before_any_weight_changes(tiny_ckpts, tmp_path):
    paths = {kind: trained_adapter(kind, tiny_ckpts[kind], tmp_path / kind) for kind in PIPELINES}
    for kind, other in (("sd3", "flux"), ("flux", "sd3")):
        pipe = PIPELINES[kind].from_pretrained(tiny_ckpts[kind])
        before = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
        with pytest.raises(UsageError, match="does not fit this .*another model"):
            lora.load_lora(pipe, paths[other])
        for name, param in pipe.transformer.named_parameters():
            assert torch.equal(param, before[name])
        assert not getattr(pipe.transformer, "peft_config", None)


def test_same_model_of_other_width_is_refused(tiny_ckpts, tmp_path):
    path = trained_adapter("sd3", tiny_ckpts["sd3"], tmp_path / "a")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "wide.safetensors")
    with pytest.raises(UsageError, match="shape"):
        lora.check_adapter(StableDiffusion3Pipeline.from_pretrained(tiny_ckpts["sd3"]).transformer,
                           tmp_path / "wide.safetensors")


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_only_targeted_linear_layers_get_trainable_adapters(tiny_ckpts, kind):
    transformer = PIPELINES[kind].from_pretrained(tiny_ckpts[kind]).transformer
    targeted = lora.add_lora(transformer, lora.lora_config(transformer, 2, layers=("attn.to_q", "attn.to_k")))
    assert targeted and all(name.endswith(("attn.to_q", "attn.to_k")) for name in targeted)
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(targeted)
    for name, p in transformer.named_parameters():  # B starts at zero: the adapted model is the pretrained one
        if ".lora_B." in name:
            assert not p.any()


def test_a_rank_that_targets_nothing_is_refused(tiny_ckpts, tmp_path):
    transformer = StableDiffusion3Pipeline.from_pretrained(tiny_ckpts["sd3"]).transformer
    with pytest.raises(UsageError, match="--lora_layers: attn.to_qq match"):
        layers = lora.parse_lora_layers("attn.to_q, attn.to_qq")
        lora.add_lora(transformer, lora.lora_config(transformer, 4, layers=layers))
    with pytest.raises(UsageError, match="proj_mlp"):  # a Flux-only module
        lora.add_lora(transformer, lora.lora_config(transformer, 4, layers=("proj_mlp",)))
    assert not getattr(transformer, "peft_config", None)
    with pytest.raises(UsageError, match="--lora_rank 0"):
        lora.lora_config(transformer, 0)
    with pytest.raises(UsageError, match="--lora_alpha"):
        lora.lora_config(transformer, 4, alpha=0)
    assert lora.parse_lora_layers("") is None and lora.parse_lora_layers(" a , b ") == ("a", "b")


def test_lora_path_errors_say_what_to_give(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        lora.adapter_file(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="holds no pytorch_lora_weights.safetensors"):
        lora.adapter_file(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match=".safetensors"):
        lora.adapter_file(tmp_path / "x.bin")
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="not a readable safetensors"):
        lora.read_adapter_shapes(tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------------------------------
# Training with --lora_rank (tiny models, CPU, plain accelerate fp32; DeepSpeed in the slow test)
# ---------------------------------------------------------------------------------------------------------

from test_training import launch_deepspeed, make_dataset, train  # noqa: E402  (the trainers' test helpers)

LORA_FLAGS = ("--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_run_trains_only_the_adapter_and_merges_it_into_the_pretrained_weights(tiny_ckpts, photos, tmp_path,
                                                                                     kind):
    out = tmp_path / "out"
    train(kind, tiny_ckpts[kind], photos, out, *LORA_FLAGS, "--merge_lora")
    tensors = load_file(out / lora.WEIGHT_NAME)
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in tensors.items())
    pretrained = PIPELINES[kind].from_pretrained(tiny_ckpts[kind]).transformer.state_dict()
    merged = PIPELINES[kind].from_pretrained(out).transformer.state_dict()  # --merge_lora: a complete pipeline
    assert merged.keys() == pretrained.keys()
    adapted = 0
    for name, weight in pretrained.items():
        module = name.removesuffix(".weight")
        if f"transformer.{module}.lora_A.weight" in tensors:  # W + alpha / r * B A, from the saved adapter
            a, b = tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"]
            torch.testing.assert_close(merged[name], weight + 2.0 * b @ a, rtol=1e-5, atol=1e-6)
            adapted += 1
        else:  # every other weight is the pretrained one, bit for bit
            assert torch.equal(merged[name], weight), name
    assert adapted == len(tensors) // 2 > 0


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_two_steps_resume_two_steps_equals_four_steps(tiny_ckpts, photos, tmp_path, kind):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(kind, tiny_ckpts[kind], photos, whole, *LORA_FLAGS, "--max_train_steps", "4", "--checkpointing_steps", "2")
    train(kind, tiny_ckpts[kind], photos, split, *LORA_FLAGS, "--max_train_steps", "2", "--checkpointing_steps", "2")
    checkpoint = split / "checkpoint-2"
    assert lora.adapter_file(checkpoint) == checkpoint / lora.WEIGHT_NAME  # --lora_path OUT/checkpoint-N works
    assert not list(checkpoint.glob("model*.safetensors")), "the checkpoint holds a full copy of the frozen model"
    train(kind, tiny_ckpts[kind], photos, split, *LORA_FLAGS, "--max_train_steps", "4", "--checkpointing_steps", "2",
          "--resume_from_checkpoint", "latest")
    a, b = load_file(whole / lora.WEIGHT_NAME), load_file(split / lora.WEIGHT_NAME)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (whole / "losses.csv").read_text() == (split / "losses.csv").read_text()
    assert not (split / "model_index.json").exists()  # without --merge_lora the output is the adapter alone


def test_lora_flags_that_train_nothing_are_refused_before_anything_runs(tiny_ckpts, photos, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--lora_layers: attn.to_qq match"):
        train("sd3", tiny_ckpts["sd3"], photos, out, "--lora_rank", "4", "--lora_layers", "attn.to_q,attn.to_qq")
    with pytest.raises(UsageError, match="--lora_alpha, --merge_lora only apply to LoRA"):
        train("flux", tiny_ckpts["flux"], photos, out, "--lora_alpha", "8", "--merge_lora")
    with pytest.raises(UsageError, match="--lora_rank -1"):
        train("flux", tiny_ckpts["flux"], photos, out, "--lora_rank", "-1")
    assert not out.exists()


@pytest.mark.slow
def test_lora_under_deepspeed_zero2_checkpoints_the_adapter_and_resumes_exactly(tiny_ckpts, photos, tmp_path):
    def launch(out, steps, *flags):
        launch_deepspeed("train_flux.py", "--pretrained_model_name_or_path", str(tiny_ckpts["flux"]),
                         "--instance_data_dir", str(photos), "--output_dir", str(out), "--resolution", "128",
                         "--train_batch_size", "2", "--max_sequence_length", "32", "--report_to", "none",
                         "--max_train_steps", str(steps), "--checkpointing_steps", "1", *LORA_FLAGS, *flags)

    out, split = tmp_path / "ds", tmp_path / "split"
    launch(out, 2)
    launch(split, 1)
    launch(split, 2, "--resume_from_checkpoint", "latest")
    resumed = load_file(split / lora.WEIGHT_NAME)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["engine"]["distributed_type"] == "DEEPSPEED" and summary["engine"]["zero_stage"] == 2
    final, step1 = load_file(out / lora.WEIGHT_NAME), load_file(out / "checkpoint-1" / lora.WEIGHT_NAME)
    assert final.keys() == step1.keys() and any(not torch.equal(final[k], step1[k]) for k in final)
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    pipe = FluxPipeline.from_pretrained(tiny_ckpts["flux"])
    lora.load_lora(pipe, out / "checkpoint-1")
