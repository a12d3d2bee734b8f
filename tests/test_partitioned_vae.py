"""The F=16 VAE: exact against un-partitioned references, any size, weights untouched, usable in SD3/Flux pipelines."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline

from partitioned_vae import (
    MODES,
    authors_upsample_conv,
    check_size,
    is_f16_vae,
    load_f16_vae,
    make_f16_vae,
    partitioned_upsample_conv,
    subpixel_upsample_conv,
    use_f16_vae,
)
from tiny_models import build_tiny_vae


def reference_upsample_conv(x, weight, bias):
    """Nearest 2x up-sampling of the whole map, then the 3x3 conv with padding 1."""
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def authors_loop(x, weight, bias):
    """The authors' partitioned last layer as they describe it: a 2 x 2 grid of quarter tiles, each read with a
    one-pixel halo clipped at the border and zero-padded on the border side, nearest 2x, conv with padding 1,
    then the crop [1 : 2h+1, 1 : 2w+1] of each tile."""
    h, w = x.shape[2] // 2, x.shape[3] // 2
    rows = []
    for i in (0, h):
        row = []
        for j in (0, w):
            tile = x[:, :, max(i - 1, 0):min(i + h + 1, 2 * h), max(j - 1, 0):min(j + w + 1, 2 * w)]
            left, right = (1, 0) if j == 0 else (0, 1)
            top, bottom = (1, 0) if i == 0 else (0, 1)
            tile = F.pad(tile, (left, right, top, bottom))
            tile = F.conv2d(F.interpolate(tile, scale_factor=2, mode="nearest"), weight, bias, padding=1)
            row.append(tile[:, :, 1:2 * h + 1, 1:2 * w + 1])
        rows.append(torch.cat(row, dim=3))
    return torch.cat(rows, dim=2)


def features_before_conv_out(vae, z):
    """The original decoder's input to its last conv, captured with a hook."""
    captured = {}
    handle = vae.decoder.conv_out.register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0]))
    vae.decode(z)
    handle.remove()
    return captured["x"]


@pytest.mark.parametrize("batch,h,w,grid", [(1, 8, 8, 2), (2, 5, 7, 3), (1, 9, 6, 3), (2, 4, 12, 4), (1, 3, 3, 5)])
def test_last_layer_modes_equal_reference(batch, h, w, grid):
    torch.manual_seed(0)
    # Weights scaled as in a trained conv (std 1/sqrt(fan_in)), so outputs are image-sized (about unit scale).
    x, weight, bias = torch.randn(batch, 16, h, w), torch.randn(3, 16, 3, 3) / 12, torch.randn(3)
    expected = reference_upsample_conv(x, weight, bias)
    assert (partitioned_upsample_conv(x, weight, bias, grid) - expected).abs().max() < 1e-5
    assert (subpixel_upsample_conv(x, weight, bias) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("batch,h,w", [(1, 8, 8), (2, 6, 10), (1, 16, 4)])
def test_authors_mode_equals_their_loop_and_the_exact_decode_shifted_one_pixel(batch, h, w):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(batch, 16, h, w), torch.randn(3, 16, 3, 3) / 12, torch.randn(3)
    ours = authors_upsample_conv(x, weight, bias, grid=2)
    assert ours.shape == (batch, 3, 2 * h, 2 * w)
    assert (ours - authors_loop(x, weight, bias)).abs().max() < 1e-5
    exact = reference_upsample_conv(x, weight, bias)
    assert (ours[:, :, 1:, 1:] - exact[:, :, :-1, :-1]).abs().max() < 1e-5  # one pixel down and right
    assert (ours - exact).abs().max() > 0.1  # and so not the exact decode
    # Any grid gives the same shifted decode (odd sizes included), tile by tile.
    assert (authors_upsample_conv(x[:, :, 1:, 1:], weight, bias, grid=3)[:, :, 1:, 1:]
            - reference_upsample_conv(x[:, :, 1:, 1:], weight, bias)[:, :, :-1, :-1]).abs().max() < 1e-5


def test_authors_mode_decodes_as_their_decoder_and_survives_save_load(tmp_path):
    original = build_tiny_vae("flux", seed=0).eval()
    z = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(5))
    make_f16_vae(copy.deepcopy(original), "authors").save_pretrained(tmp_path / "vae")
    vae = load_f16_vae(tmp_path)
    assert vae.decoder.conv_out.mode == "authors"
    with torch.no_grad():
        hidden = features_before_conv_out(original, z)
        expected = authors_loop(hidden, original.decoder.conv_out.weight, original.decoder.conv_out.bias)
        image = vae.decode(z).sample
    assert image.shape == (2, 3, 48, 64)
    assert (image - expected).abs().max() < 1e-5


@pytest.mark.parametrize("latent_hw,grid", [((4, 4), 2), ((3, 5), 2), ((5, 7), 3)])
def test_decode_modes_equal_reference_decoder(latent_hw, grid):
    original = build_tiny_vae("sd3", seed=0).eval()
    z = torch.randn(2, 16, *latent_hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = features_before_conv_out(original, z)  # (2, C, 8h, 8w): the F=8 decoder up to its last conv
        expected = reference_upsample_conv(hidden, original.decoder.conv_out.weight, original.decoder.conv_out.bias)
        vae = make_f16_vae(copy.deepcopy(original))
        for mode in MODES:
            make_f16_vae(vae, mode, grid)
            image = vae.decode(z).sample
            assert image.shape == (2, 3, 16 * latent_hw[0], 16 * latent_hw[1])
            assert (image - expected).abs().max() < 1e-5, mode


def test_encoder_is_stride_two_conv_in():
    original = build_tiny_vae("flux", seed=0).eval()
    image = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        handle = original.encoder.conv_in.register_forward_hook(lambda m, inputs, out: out[:, :, ::2, ::2])
        expected = original.encode(image).latent_dist.mean
        handle.remove()
        latent = make_f16_vae(copy.deepcopy(original)).encode(image).latent_dist.mean
    assert latent.shape == (1, 16, 96 // 16, 160 // 16)
    assert (latent - expected).abs().max() < 1e-5


def test_4096_image_gives_256_latent_and_decodes_back():
    torch.manual_seed(0)
    # Thin but with the SD3/Flux VAE topology (4 blocks, 16 latent channels); no mid attention: 65,536 tokens on a CPU.
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=16, norm_num_groups=2,
                        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False).eval()
    make_f16_vae(vae, "subpixel")
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 4096, 4096)).latent_dist.mode()
        assert latent.shape == (1, 16, 256, 256)
        assert vae.decode(latent).sample.shape == (1, 3, 4096, 4096)


def test_state_dict_unchanged_and_save_load_round_trip(tmp_path):
    original = build_tiny_vae("sd3", seed=0).eval()
    vae = make_f16_vae(copy.deepcopy(original), "subpixel", 3)
    before, after = original.state_dict(), vae.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)

    vae.save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["f16_vae"] == {"mode": "subpixel", "grid": 3}
    plain = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    loaded = load_f16_vae(tmp_path)  # a pipeline folder: finds vae/
    assert is_f16_vae(loaded) and loaded.decoder.conv_out.mode == "subpixel" and loaded.decoder.conv_out.grid == 3
    z = torch.randn(1, 16, 3, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)
    assert load_f16_vae(tmp_path / "vae", mode="full").decoder.conv_out.mode == "full"


def test_load_errors_name_the_missing_thing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_f16_vae(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No VAE config.json"):
        load_f16_vae(tmp_path)
    build_tiny_vae("sd3").save_config(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_f16_vae(tmp_path)


def test_check_size():
    check_size(512, 384)
    check_size(4096, 3072)
    with pytest.raises(ValueError, match="height 500 is not a multiple of 32: use 480 or 512"):
        check_size(500, 512)
    with pytest.raises(ValueError, match="width 20 is not a multiple of 32: use 32"):
        check_size(512, 20)
    with pytest.raises(ValueError, match="positive"):
        check_size(0, 512)


def test_slicing_and_tiling():
    vae = make_f16_vae(build_tiny_vae("sd3", seed=0).eval(), "partitioned")  # sample_size 256: 16-latent tiles
    z = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = vae.decode(z).sample
        vae.enable_slicing()
        assert (vae.decode(z).sample - whole).abs().max() < 1e-4  # batched vs one-by-one decoder kernels
        vae.enable_tiling()
        assert vae.encode(torch.zeros(1, 3, 768, 640)).latent_dist.mean.shape == (1, 16, 48, 40)
        assert vae.decode(torch.zeros(1, 16, 48, 40)).sample.shape == (1, 3, 768, 640)


@pytest.mark.parametrize("kind,pipeline_class,processor_factor", [
    ("sd3", StableDiffusion3Pipeline, 16), ("flux", FluxPipeline, 32)])
def test_pipelines_generate_512x384(tiny_ckpts, kind, pipeline_class, processor_factor):
    pipe = pipeline_class.from_pretrained(tiny_ckpts[kind])
    use_f16_vae(pipe, "subpixel")
    use_f16_vae(pipe, "partitioned")  # a second call only switches the mode
    assert pipe.vae_scale_factor == 16 and pipe.image_processor.config.vae_scale_factor == processor_factor
    assert pipe.vae.decoder.conv_out.mode == "partitioned"
    images = pipe("a cat", height=512, width=384, num_inference_steps=2, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(384, 512)] * 2


def test_unknown_mode_is_rejected_and_leaves_the_vae_unchanged():
    vae = build_tiny_vae("sd3", seed=0)
    with pytest.raises(ValueError, match="choose one of full, partitioned, subpixel, authors"):
        make_f16_vae(vae, "tiled")
    assert not is_f16_vae(vae) and vae.encoder.conv_in.stride == (1, 1)
