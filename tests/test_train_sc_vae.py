"""train_sc_vae.py: each loss term against an independent computation, frozen parts stay frozen, exact resume."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

import train_sc_vae
from conftest import recorded, recording_launch
from errors import UsageError
from partitioned_vae import load_f16_vae
from reconstruction import load_lpips
from tiny_models import build_tiny_vae, save_tiny_lpips_weights
from train_sc_vae import (Discriminator, crop_pixels, discriminator_losses, generator_losses, load_vaes,
                          reconstruct_with_features)

SIZE = 64
WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny pipeline-style folder (vae/), random LPIPS weights and an SA-1B-style imagefolder with empty texts,
    one unreadable image and one missing one."""
    root = tmp_path_factory.mktemp("sc_vae")
    build_tiny_vae("flux", seed=0).save_pretrained(root / "model" / "vae")
    backbone, heads = save_tiny_lpips_weights(root / "lpips", "alex", seed=1)
    images = root / "sa1b"
    images.mkdir()
    lines = []
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.jpg", quality=95)
        lines.append({"file_name": f"{name}.jpg", "text": ""})
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    lines += [{"file_name": "broken.jpg", "text": ""}, {"file_name": "missing.jpg", "text": ""}]
    (images / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"model": root / "model", "backbone": backbone, "heads": heads, "data": images}


def photos(size=SIZE):
    """Two photos as centre crops in [-1, 1]."""
    return torch.stack([crop_pixels(Image.fromarray(getattr(data, n)()), size) for n in ("astronaut", "chelsea")])


def decoder_input_to_last_conv(vae, z):
    """The decoder run layer by layer up to (not through) its last conv."""
    d = vae.decoder
    h = d.mid_block(d.conv_in(z))
    for block in d.up_blocks:
        h = block(h)
    return d.conv_act(d.conv_norm_out(h))


def test_each_loss_term_equals_an_independent_computation(files, torchmetrics_lpips):
    teacher, student = load_vaes(files["model"], "partitioned")
    x = photos()
    x_hat, f_student = reconstruct_with_features(student, x, torch.Generator().manual_seed(0))
    _, f_teacher = reconstruct_with_features(teacher, x, torch.Generator().manual_seed(1))
    # The posterior sample, decoded, and the features feeding the last conv.
    posterior = student.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_hat, student.decode(z).sample.clamp(-1, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_student, decoder_input_to_last_conv(student, z), rtol=1e-5, atol=1e-6)
    assert f_student.shape[-1] == SIZE // 2 and f_teacher.shape[-1] == SIZE

    torch.manual_seed(0)
    discriminator = Discriminator(channels=16, depth=4).eval()  # eval: spectral norm's power iteration holds still
    lpips_metric = load_lpips("alex", files["backbone"], files["heads"])
    last_layer = student.decoder.conv_out.weight
    terms = generator_losses(x, x_hat, f_student, f_teacher, discriminator, lpips_metric, last_layer, (0.1, 0.05, 1.0))

    mse = ((x_hat - x) ** 2).mean()
    lpips_term = torchmetrics_lpips(files["backbone"], files["heads"])(x_hat, x).mean()
    gen = -discriminator(x_hat).mean()
    up = f_student.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    sc = ((f_teacher - up) ** 2).mean()
    norms = []
    for term in (lpips_term, gen):  # each term's gradient on the last conv, by a backward pass of its own
        last_layer.grad = None
        term.backward(retain_graph=True)
        norms.append(last_layer.grad.norm())
    weight = min(float(norms[0] / max(norms[1], 1e-8)), 1e4)
    for name, expected in (("mse", mse), ("lpips", lpips_term), ("gen", gen), ("sc", sc)):
        assert terms[name].item() == pytest.approx(expected.item(), rel=1e-5), name
    assert float(terms["weight"]) == pytest.approx(weight, rel=1e-4) and 0 < weight < 1e4
    assert terms["loss"].item() == pytest.approx((mse + 0.1 * lpips_term + 0.05 * weight * gen + sc).item(), rel=1e-5)
    assert all(terms[name].item() != 0 for name in ("mse", "lpips", "gen", "sc"))

    # Without LPIPS (--lpips_scale 0) the adaptive weight balances the MSE term.
    no_lpips = generator_losses(x, x_hat, f_student, f_teacher, discriminator, None, last_layer, (0.0, 0.05, 1.0))
    last_layer.grad = None
    mse.backward(retain_graph=True)
    mse_norm = last_layer.grad.norm()
    assert no_lpips["lpips"].item() == 0
    assert no_lpips["weight"].item() == pytest.approx(min(float(mse_norm / max(norms[1], 1e-8)), 1e4), rel=1e-4)

    # Discriminator: hinge on raw logits, and the gradient penalty from per-image backward passes.
    d_terms = discriminator_losses(discriminator, x, x_hat, gp_weight=10.0)
    hinge = torch.clamp(1 - discriminator(x), min=0).mean() + torch.clamp(1 + discriminator(x_hat), min=0).mean()
    penalties = []
    for image in x:
        image = image[None].clone().requires_grad_(True)
        discriminator(image).sum().backward()
        penalties.append((image.grad.flatten().norm() - 1) ** 2)
    gp = torch.stack(penalties).mean()
    assert d_terms["hinge"].item() == pytest.approx(hinge.item(), rel=1e-5)
    assert d_terms["gp"].item() == pytest.approx(gp.item(), rel=1e-4) and gp.item() > 0
    assert d_terms["loss"].item() == pytest.approx((hinge + 10 * gp).item(), rel=1e-4)


def train(files, output_dir, *flags):
    """One in-process run on the CPU at 64x64; returns train_summary.json."""
    argv = ["--pretrained_model_name_or_path", str(files["model"]), "--train_data_dir", str(files["data"]),
            "--output_dir", str(output_dir), "--resolution", str(SIZE), "--train_batch_size", "2",
            "--lpips_net", "alex", "--lpips_backbone", str(files["backbone"]), "--lpips_heads", str(files["heads"]),
            "--discriminator_channels", "16", "--discriminator_depth", "4", "--report_to", "none",
            "--num_validation_images", "2", *flags]
    train_sc_vae.main(train_sc_vae.parse_args(argv))
    return json.loads((output_dir / "train_summary.json").read_text())


def test_training_changes_only_the_decoder_and_two_plus_two_steps_equal_four(files, tmp_path, monkeypatch):
    teachers, original_load = [], train_sc_vae.load_vaes

    def load_and_keep_the_teacher(*args):
        teacher, student = original_load(*args)
        teachers.append(teacher)
        return teacher, student

    monkeypatch.setattr(train_sc_vae, "load_vaes", load_and_keep_the_teacher)
    flags = ("--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--discr_learning_rate", "1e-3",
             "--use_ema", "--ema_decay", "0.9", "--checkpointing_steps", "2", "--validation_steps", "2")
    straight = train(files, tmp_path / "straight", *flags, "--max_train_steps", "4", "--checkpoints_total_limit", "1",
                     "--report_to", "tensorboard")
    train(files, tmp_path / "split", *flags, "--max_train_steps", "2")
    resumed = train(files, tmp_path / "split", *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")

    assert resumed["resumed_from_step"] == 2 and [r["step"] for r in resumed["losses"]] == [3, 4]
    for ours, expected in zip(resumed["losses"], straight["losses"][2:]):
        assert ours.keys() == expected.keys() and all(ours[k] == pytest.approx(expected[k], rel=1e-6) for k in ours)
    assert set(straight["losses"][0]) >= {"g_mse", "g_lpips", "g_gen", "g_sc", "g_weight", "g_loss"}
    assert set(straight["losses"][1]) == {"step", "d_hinge", "d_gp", "d_loss"}  # generator and discriminator alternate
    split, whole = load_file(tmp_path / "split" / WEIGHTS), load_file(tmp_path / "straight" / WEIGHTS)
    assert all(torch.allclose(split[k], whole[k], rtol=1e-5, atol=1e-7) for k in whole)

    # The teacher and the student's encoder are the pretrained weights; the decoder moved.
    pretrained = load_file(files["model"] / WEIGHTS)
    for teacher in teachers:
        assert all(torch.equal(v, pretrained[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(whole[k], pretrained[k]) for k in pretrained if k.startswith("encoder."))
    assert max((whole[k] - pretrained[k]).abs().max() for k in pretrained if k.startswith("decoder.")) > 1e-4

    # Outputs: a loadable F=16 VAE folder, the newest checkpoint only, validation, TensorBoard, skipped images.
    vae = load_f16_vae(tmp_path / "straight")
    assert vae.decoder.conv_out.mode == "partitioned" and vae.encoder.conv_in.stride == (2, 2)
    assert [p.name for p in (tmp_path / "straight").glob("checkpoint-*")] == ["checkpoint-4"]
    assert (tmp_path / "straight" / "validation" / "step-000004.png").is_file() and straight["val_psnr"] > 0
    assert list((tmp_path / "straight" / "logs").rglob("events.out.tfevents.*"))
    assert straight["n_skipped"] == 2 and straight["skipped_images"][0].startswith("broken.jpg")


def test_a_few_steps_on_a_fixed_batch_lower_the_reconstruction_loss(files, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BILINEAR).save(folder / "astronaut.png")
    summary = train({**files, "data": folder}, tmp_path / "out", "--no-random_flip", "--train_batch_size", "1",
                    "--learning_rate", "2e-3", "--discr_learning_rate", "2e-3", "--max_train_steps", "12",
                    "--validation_steps", "100")
    x = crop_pixels(Image.open(folder / "astronaut.png").convert("RGB"), SIZE)[None]
    with torch.no_grad():
        before, after = (((vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x) ** 2).mean()
                         for vae in (load_f16_vae(files["model"]), load_f16_vae(tmp_path / "out")))
    assert after < 0.7 * before
    mse = [row["g_mse"] for row in summary["losses"] if "g_mse" in row]
    assert np.mean(mse[-2:]) < np.mean(mse[:2])


def test_usage_errors(files, tmp_path):
    with pytest.raises(UsageError, match="--lpips_scale 0.1 needs --lpips_backbone.*vgg16"):
        train_sc_vae.main(train_sc_vae.parse_args(["--pretrained_model_name_or_path", str(files["model"]),
                                                   "--train_data_dir", str(files["data"]), "--resolution", "128"]))
    with pytest.raises(UsageError, match="--resolution 72 must be a multiple of 16"):
        train(files, tmp_path / "a", "--resolution", "72")
    with pytest.raises(UsageError, match="too small for --discriminator_depth 6"):
        train(files, tmp_path / "b", "--discriminator_depth", "6")
    with pytest.raises(UsageError, match="nowhere is not a folder"):
        train(files, tmp_path / "c", "--train_data_dir", str(tmp_path / "nowhere"))
    load_f16_vae(files["model"]).save_pretrained(tmp_path / "f16")
    with pytest.raises(UsageError, match="is an F=16 VAE"):
        train(files, tmp_path / "d", "--pretrained_model_name_or_path", str(tmp_path / "f16"))


def test_launch_script_passes_the_authors_settings(repo_root, tmp_path):
    result = subprocess.run(["bash", str(repo_root / "train_sc_vae.sh"), "--report_to", "none"],
                            env=recording_launch(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    args = recorded(tmp_path, "accelerate")
    script = str(repo_root / "train_sc_vae.py")  # checked first in one process, with the same flags
    assert recorded(tmp_path, "python") == [script, *args[args.index(script) + 1:], "--check_only"]
    flag = {name: args[args.index(name) + 1] for name in args if name.startswith("--") and name != "--use_ema"
            and name != "--gradient_checkpointing" and args.index(name) + 1 < len(args)}
    assert flag["--config_file"].endswith("sc_vae_config.yaml") and flag["--num_processes"] == "4"
    assert int(flag["--train_batch_size"]) * int(flag["--gradient_accumulation_steps"]) * 4 == 256
    assert (flag["--resolution"], flag["--learning_rate"], flag["--discr_learning_rate"], flag["--adam_weight_decay"],
            flag["--lpips_scale"], flag["--gen_scale"], flag["--sc_scale"], flag["--mixed_precision"],
            flag["--num_train_epochs"], flag["--lpips_net"]) == (
        "512", "1e-5", "1e-5", "1e-4", "0.1", "0.05", "1", "no", "1", "vgg")
    assert "--use_ema" in args and args[-2:] == ["--report_to", "none"]


@pytest.mark.slow
def test_two_processes_train_through_ddp(files, tmp_path, repo_root):
    """Two CPU processes (gloo DDP): generator steps, the gradient penalty and checkpoints through the wrappers."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [os.path.join(os.path.dirname(os.sys.executable), "torchrun"), "--nproc_per_node", "2",
               "--master_port", "29561", str(repo_root / "train_sc_vae.py"),
               "--pretrained_model_name_or_path", str(files["model"]), "--train_data_dir", str(files["data"]),
               "--output_dir", str(tmp_path / "ddp"), "--resolution", str(SIZE), "--train_batch_size", "1",
               "--lpips_net", "alex", "--lpips_backbone", str(files["backbone"]), "--lpips_heads", str(files["heads"]),
               "--discriminator_channels", "16", "--discriminator_depth", "4", "--max_train_steps", "4",
               "--checkpointing_steps", "2", "--use_ema", "--report_to", "none"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 per optimiser step" in result.stderr  # 1 image x 2 accumulation x 2 processes
    assert load_f16_vae(tmp_path / "ddp").decoder.conv_out.mode == "partitioned"
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
