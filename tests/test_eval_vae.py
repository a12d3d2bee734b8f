"""eval_vae.py: each reconstruction metric against an independent reference on real photos; resume and bad files."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

import eval_vae
from errors import UsageError
from fid_metrics import add_fid_images, fid_tensor, load_fid
from imagefolder import load_image
from partitioned_vae import make_f16_vae
from reconstruction import load_lpips, lpips_distance, pixel_metrics, reconstruct, ssim, vae_round_trip
from tiny_models import build_tiny_inception_state_dict, build_tiny_vae, save_tiny_lpips_weights

PHOTOS = ("astronaut", "coffee", "chelsea")  # 512^2, 400x600, 300x451
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny VAE folder, random LPIPS and Inception weight files, and a folder of photos plus two bad files."""
    root = tmp_path_factory.mktemp("eval_vae")
    build_tiny_vae("sd3", seed=0).save_pretrained(root / "vae")
    backbone, heads = save_tiny_lpips_weights(root / "lpips", "alex", seed=1)
    torch.save(build_tiny_inception_state_dict(seed=2), root / "inception.pth")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.png")
    (photos / "notes.txt").write_text("not an image\n")
    Image.fromarray(data.rocket()).save(photos / "broken.jpg", quality=95)
    (photos / "broken.jpg").write_bytes((photos / "broken.jpg").read_bytes()[:2000])  # truncated
    return {"vae": root / "vae", "backbone": backbone, "heads": heads, "inception": root / "inception.pth",
            "photos": photos}


def photo_tensor(name, size):
    """A skimage photo as eval_vae reads it: (1, 3, size, size) in [0, 1]."""
    return fid_tensor(Image.fromarray(getattr(data, name)()), size).float().div(255).unsqueeze(0)


def hwc(x):
    """(1, 3, H, W) tensor -> H x W x 3 float64 array."""
    return x[0].permute(1, 2, 0).double().numpy()


def test_pixel_metrics_equal_scikit_image_on_photos():
    vae = make_f16_vae(build_tiny_vae("sd3", seed=0).eval())
    for name in PHOTOS:
        x = photo_tensor(name, 128)
        blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        noisy = (blurred + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        for x_hat in (reconstruct(vae, x, "partitioned"), noisy):
            ours = pixel_metrics(x, x_hat)
            a, b = hwc(x), hwc(x_hat)
            assert float(ours["nmse"]) == pytest.approx(((a - b) ** 2).sum() / (a ** 2).sum(), rel=1e-9)
            assert float(ours["nrmse"]) == pytest.approx(normalized_root_mse(a, b, normalization="euclidean"), rel=1e-9)
            assert float(ours["psnr"]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), rel=1e-9)
            reference = structural_similarity(a, b, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False)
            assert float(ours["ssim"]) == pytest.approx(reference, abs=1e-5)
            assert float(ssim(x, x_hat, strip=7)) == pytest.approx(float(ours["ssim"]), abs=1e-7)  # 17 strips
    assert 0.3 < reference < 0.99  # the noisy photo: a regime where a wrong window or border shows


def test_f8_half_is_the_f8_round_trip_of_the_antialiased_half_image_enlarged_bicubic():
    vae = build_tiny_vae("flux", seed=0).eval()
    x = photo_tensor("chelsea", 128)
    # PIL's antialiased bilinear reduction on float channels as the independent shrink.
    small = np.stack([np.asarray(Image.fromarray(c.numpy(), mode="F").resize((64, 64), Image.BILINEAR))
                      for c in x[0]])
    expected = F.interpolate(vae_round_trip(vae, torch.from_numpy(small)[None]), size=(128, 128), mode="bicubic")
    assert (reconstruct(vae, x, "f8_half") - expected.clamp(0, 1)).abs().max() < 1e-4


def test_lpips_equals_torchmetrics_with_the_same_random_weights(files, torchmetrics_lpips):
    ours = load_lpips("alex", files["backbone"], files["heads"])
    reference = torchmetrics_lpips(files["backbone"], files["heads"])  # torchmetrics' own, the same weights
    x = torch.cat([photo_tensor(name, SIZE) for name in PHOTOS])
    x_hat = (F.avg_pool2d(x, 5, stride=1, padding=2) + 0.05 * torch.randn(x.shape, generator=torch.Generator()
                                                                           .manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        values = lpips_distance(ours, x, x_hat)
        expected = reference(x_hat, x, normalize=True).flatten()
    assert values.shape == (3,) and values.min() > 1e-3
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-7)


def test_lpips_weight_errors_name_the_file_and_where_to_get_it(files, tmp_path):
    with pytest.raises(UsageError, match="--lpips_backbone is required.*alexnet-owt-7be5be79.pth"):
        load_lpips("alex", None)
    with pytest.raises(UsageError, match="is not a file.*vgg16-397923af.pth"):
        load_lpips("vgg", tmp_path / "missing.pth")
    with pytest.raises(UsageError, match="are not LPIPS-alex weights"):
        load_lpips("alex", files["heads"], files["heads"])  # heads given as the backbone


def argv(files, output, *extra):
    """A small eval_vae command line on the photos folder."""
    return ["--vae", str(files["vae"]), "--data_dir", str(files["photos"]), "--size", str(SIZE),
            "--output_json", str(output), "--lpips_backbone", str(files["backbone"]), "--lpips_heads",
            str(files["heads"]), "--inception_weights", str(files["inception"]), "--device", "cpu",
            "--num_workers", "0", "--no_progress", "--fid_feature", "64", *extra]  # 2048-d: tested in its own file


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_vae_scores_each_photo_skips_bad_files_and_resumes(files, tmp_path, monkeypatch):
    summary = eval_vae.main(eval_vae.parse_args(argv(files, tmp_path / "full.json", "--vae_mode", "partitioned")))
    assert json.loads((tmp_path / "full.json").read_text()) == summary
    assert summary["n_images"] == 3 and summary["n_skipped"] == 2 and summary["complete"]
    assert {s["file"]: s["reason"].split(" ")[0] for s in summary["skipped"]} == {"notes.txt": "not",
                                                                                  "broken.jpg": "unreadable"}
    assert summary["vae_mode"] == "partitioned" and summary["size"] == SIZE and summary["grid"] == 2
    assert summary["stand_in_metrics"] is True  # the LPIPS weights are tiny_models' random stand-ins
    rows = read_csv(tmp_path / "full.csv")
    assert [row["file"] for row in rows] == ["astronaut.png", "chelsea.png", "coffee.png"]

    # Each row against the library functions on the same image; rFID against the project's FID path.
    vae = make_f16_vae(build_tiny_vae("sd3", seed=0).eval())
    lpips_metric = load_lpips("alex", files["backbone"], files["heads"])
    fid = load_fid(files["inception"], feature=64)
    for row in rows:
        x = fid_tensor(load_image(files["photos"] / row["file"]), SIZE).float().div(255)[None]
        x_hat = reconstruct(vae, x, "partitioned")
        a, b = hwc(x), hwc(x_hat)
        assert float(row["psnr"]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), rel=1e-6)
        assert float(row["nmse"]) == pytest.approx(((a - b) ** 2).sum() / (a ** 2).sum(), rel=1e-6)
        assert float(row["ssim"]) == pytest.approx(structural_similarity(
            a, b, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
            abs=1e-5)
        with torch.no_grad():
            assert float(row["lpips"]) == pytest.approx(float(lpips_distance(lpips_metric, x, x_hat)), rel=1e-5)
        add_fid_images(fid, [load_image(files["photos"] / row["file"])], SIZE, real=True)
        add_fid_images(fid, [Image.fromarray((hwc(x_hat) * 255).round().astype(np.uint8))], SIZE, real=False)
    assert summary["rfid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert summary["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), rel=1e-12)

    # A run stopped after two photos, with a row written after the last save of the FID sums, then resumed.
    resumed = tmp_path / "resumed.json"
    eval_vae.main(eval_vae.parse_args(argv(files, resumed, "--vae_mode", "partitioned", "--max_images", "3")))
    with open(tmp_path / "resumed.csv", "a") as handle:
        handle.write("coffee.png,1,1,1,1,1\n")  # not covered by the saved FID sums: must be dropped and redone
    scored = []
    original_score = eval_vae.score_image
    monkeypatch.setattr(eval_vae, "score_image", lambda *a: scored.append(1) or original_score(*a))
    again = eval_vae.main(eval_vae.parse_args(argv(files, resumed, "--vae_mode", "partitioned")))
    assert len(scored) == 1  # only coffee.png
    assert read_csv(tmp_path / "resumed.csv") == rows
    assert {k: v for k, v in again.items() if k != "max_images"} == {k: v for k, v in summary.items()
                                                                     if k != "max_images"}

    with pytest.raises(UsageError, match="other settings.*size: 64 -> 128"):
        eval_vae.main(eval_vae.parse_args(argv(files, resumed, "--vae_mode", "partitioned", "--size", "128")))


def test_every_vae_mode_runs_and_the_exact_f16_modes_agree(files, tmp_path):
    psnr = {}
    for mode in eval_vae.EVAL_MODES:
        summary = eval_vae.main(eval_vae.parse_args(argv(files, tmp_path / f"{mode}.json", "--vae_mode", mode,
                                                         "--metrics", "psnr,ssim", "--max_images", "1")))
        assert summary["lpips"] is None and summary["rfid"] is None and summary["n_images"] == 1
        psnr[mode] = summary["psnr"]
    assert psnr["full"] == pytest.approx(psnr["partitioned"], abs=1e-6)
    assert psnr["subpixel"] == pytest.approx(psnr["partitioned"], abs=1e-6)
    assert len({round(psnr[m], 6) for m in ("f8", "f8_half", "partitioned", "authors")}) == 4


def test_eval_vae_usage_errors(files, tmp_path):
    def run(*extra):
        return eval_vae.main(eval_vae.parse_args(argv(files, tmp_path / "e.json", *extra)))

    with pytest.raises(UsageError, match="--size 72: --vae_mode partitioned needs a multiple of 16"):
        run("--vae_mode", "partitioned", "--size", "72")
    with pytest.raises(UsageError, match="--metrics 'psnr,fid'"):
        run("--metrics", "psnr,fid")
    with pytest.raises(UsageError, match="inception_weights .*does not exist.*torch-fidelity"):
        run("--inception_weights", str(tmp_path / "nowhere.pth"))
    with pytest.raises(UsageError, match="--vae: .*novae does not exist"):
        run("--metrics", "psnr", "--vae", str(tmp_path / "novae"))
    with pytest.raises(UsageError, match="--data_dir .* is not a folder"):
        run("--metrics", "psnr", "--data_dir", str(tmp_path / "nodata"))
