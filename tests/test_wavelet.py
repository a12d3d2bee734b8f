"""wavelet.py against pywavelets and plain MSE: exact Haar DWT/IDWT and the WLF loss (PROTOCOL.md §3)."""
import argparse
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_loss_weighting_for_sd3

from wavelet import WaveletLoss, haar_dwt2d, haar_dwt2d_as_authors, haar_idwt2d, parse_band_weights

SHAPES = [(2, 3, 8, 6), (1, 2, 4, 10), (3, 1, 16, 16)]
ODD_SHAPES = [(2, 2, 7, 5), (1, 3, 10, 13), (2, 1, 9, 12)]


def pywt_coeffs(x, levels):
    """pywt.wavedec2 (default "symmetric" mode) of a torch tensor over its last two axes, as numpy arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pywt warns when a level sees fewer than 2 samples; still exact
        return pywt.wavedec2(x.detach().numpy(), "haar", level=levels, axes=(-2, -1))


def trainer_mse(pred, target, weighting):
    """The authors' / diffusers' weighted loss: mean over samples of mean(w_t * (pred - target)^2)."""
    return torch.mean((weighting * (pred - target) ** 2).reshape(pred.shape[0], -1), 1).mean()


def pywt_loss(pred, target, weighting, levels, band_weights):
    """The WLF loss computed from pywt's coefficients: weighted sum of squares / number of coefficients."""
    coeffs = pywt_coeffs(pred - target, levels)
    per_sample = band_weights[0] * (coeffs[0] ** 2).sum((1, 2, 3))
    count = coeffs[0][0].size
    for details in coeffs[1:]:
        for w, band in zip(band_weights[1:], details):
            per_sample = per_sample + w * (band**2).sum((1, 2, 3))
            count += band[0].size
    return float((weighting.reshape(-1).numpy() * per_sample).sum() / (len(per_sample) * count))


def sd3_weighting(batch, dtype=torch.float32, seed=0):
    """Non-uniform per-sample weights, shape (B, 1, 1, 1), from diffusers' "cosmap" scheme at random sigmas."""
    sigmas = torch.rand(batch, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return compute_loss_weighting_for_sd3("cosmap", sigmas)


# ------------------------------------------------------------------ the transform


@pytest.mark.parametrize("shape", SHAPES + ODD_SHAPES)
def test_one_level_equals_pywt_dwt2(shape):
    x = torch.randn(shape, dtype=torch.float64)
    ll, (lh, hl, hh) = haar_dwt2d(x)
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))
    # Documented mapping: LL = cA, LH = cH, HL = cV, HH = cD, same signs.
    for ours, ref in [(ll, ca), (lh, ch), (hl, cv), (hh, cd)]:
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("shape", SHAPES + ODD_SHAPES)
def test_multilevel_equals_pywt_wavedec2(shape, levels):
    x = torch.randn(shape, dtype=torch.float64)
    ours, ref = haar_dwt2d(x, levels), pywt_coeffs(x, levels)
    assert len(ours) == len(ref) == levels + 1
    np.testing.assert_allclose(ours[0].numpy(), ref[0], rtol=0, atol=1e-12)
    for our_level, ref_level in zip(ours[1:], ref[1:]):
        for a, b in zip(our_level, ref_level):
            np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-12)


def test_odd_size_is_edge_replicate_padding():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    padded = torch.cat([x, x[..., -1:, :]], -2)
    padded = torch.cat([padded, padded[..., -1:]], -1)
    for a, b in zip(haar_dwt2d(x)[1], haar_dwt2d(padded)[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES + ODD_SHAPES)
def test_idwt_inverts_dwt_float64(shape, levels):
    x = torch.randn(shape, dtype=torch.float64)
    back = haar_idwt2d(haar_dwt2d(x, levels), size=shape[-2:])
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_idwt_equals_pywt_waverec2():
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    coeffs = haar_dwt2d(x, 2)
    ref = pywt.waverec2(pywt_coeffs(x, 2), "haar", axes=(-2, -1))
    np.testing.assert_allclose(haar_idwt2d(coeffs).numpy(), ref, rtol=0, atol=1e-12)


def test_bf16_roundtrip_within_bf16_precision():
    x = torch.randn(2, 4, 16, 12).to(torch.bfloat16)
    coeffs = haar_dwt2d(x, 2)
    assert coeffs[0].dtype == torch.bfloat16
    back = haar_idwt2d(coeffs)
    # bf16 keeps 8 significant bits; a few roundings of O(1) values stay well within 0.05.
    torch.testing.assert_close(back.float(), x.float(), rtol=0, atol=0.05)
    assert not torch.equal(back, torch.zeros_like(back))


def test_dwt_is_differentiable():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_dwt2d(t, 2)[1][0], (x,))
    bands = [torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda ll, lh, hl, hh: haar_idwt2d([ll, (lh, hl, hh)]), bands)


# ------------------------------------------------------------------ the loss (PROTOCOL.md §3)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_equal_weights_equal_mse_exactly(levels):
    """PROTOCOL.md §3: with equal band weights on even sizes the WLF loss IS the MSE loss, gradients included."""
    torch.manual_seed(levels)
    pred = torch.randn(3, 4, 32, 24, requires_grad=True)
    target = torch.randn(3, 4, 32, 24)
    weighting = sd3_weighting(3)
    for w, ref in [(None, F.mse_loss(pred, target)), (weighting, trainer_mse(pred, target, weighting))]:
        wlf = WaveletLoss(levels)(pred, target, w)
        torch.testing.assert_close(wlf, ref, rtol=1e-6, atol=0)
        (g_wlf,), (g_ref,) = torch.autograd.grad(wlf, pred), torch.autograd.grad(ref, pred)
        torch.testing.assert_close(g_wlf, g_ref, rtol=1e-6, atol=1e-6 * g_ref.abs().max().item())


def test_equal_weights_equal_mse_at_4k_latent_size():
    """The paper's setting: SD3 latents of a 4096^2 image through the F=16 VAE are 16 x 256 x 256."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 256, 256, requires_grad=True), torch.randn(2, 16, 256, 256)
    weighting = sd3_weighting(2)
    wlf, ref = WaveletLoss(1)(pred, target, weighting), trainer_mse(pred, target, weighting)
    torch.testing.assert_close(wlf, ref, rtol=1e-6, atol=0)
    (g_wlf,), (g_ref,) = torch.autograd.grad(wlf, pred), torch.autograd.grad(ref, pred)
    torch.testing.assert_close(g_wlf, g_ref, rtol=1e-6, atol=1e-6 * g_ref.abs().max().item())


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_band_weights_change_the_objective(levels):
    torch.manual_seed(10 + levels)
    pred = torch.randn(2, 4, 32, 32, requires_grad=True)
    target = torch.randn(2, 4, 32, 32)
    wlf = WaveletLoss(levels, (1, 2, 2, 2))(pred, target)
    mse = F.mse_loss(pred, target)
    assert abs(wlf.item() / mse.item() - 1) > 0.1  # white noise has most energy in the detail bands
    (g_wlf,), (g_mse,) = torch.autograd.grad(wlf, pred), torch.autograd.grad(mse, pred)
    cosine = F.cosine_similarity(g_wlf.flatten(), g_mse.flatten(), dim=0)
    assert cosine < 0.999  # not a rescaled MSE gradient: a different direction


@pytest.mark.parametrize("band_weights", [(1, 2, 2, 2), (0.5, 1, 3, 0), (0, 1, 1, 1), (3, 1, 1, 1)])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (2, 3, 16, 12), (2, 2, 7, 5), (3, 1, 10, 13)])
def test_loss_equals_pywt_reference(shape, levels, band_weights):
    """Independent reference: pywt coefficients, weighted sum of squares, divided by the coefficient count."""
    pred, target = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    weighting = sd3_weighting(shape[0], torch.float64)
    ours = WaveletLoss(levels, band_weights)(pred, target, weighting).item()
    assert ours == pytest.approx(pywt_loss(pred, target, weighting, levels, band_weights), rel=1e-12)


@pytest.mark.parametrize("band_weights", [(0.5, 1, 2, 3), (1, 2, 2, 2), (0, 1, 1, 1)])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 1, 6, 4), (1, 2, 5, 7)])
def test_custom_backward_passes_gradcheck(shape, levels, band_weights):
    """Both hand-written backwards (equal detail weights on sizes divisible by 2^levels; everything else)."""
    pred = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weighting = sd3_weighting(shape[0], torch.float64)
    loss = WaveletLoss(levels, band_weights)
    assert torch.autograd.gradcheck(lambda p: loss(p, target.detach(), weighting), (pred,))
    g_pred, g_target = torch.autograd.grad(loss(pred, target, weighting), (pred, target))
    torch.testing.assert_close(g_target, -g_pred, rtol=0, atol=0)


@pytest.mark.parametrize("band_weights", [(1, 2, 2, 2), (0, 1, 1, 1), (4, 1, 1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_parseval_form_equals_band_by_band_form(levels, band_weights):
    """Equal detail weights are computed as w ||d||^2 + (w_ll - w) ||LL_J||^2 (no detail band is formed); any
    other weights band by band from 2x2 Gram matrices. Nudging one detail weight by 1e-12 switches to the
    second form on the same input: values and gradients must agree."""
    torch.manual_seed(levels)
    pred = torch.randn(2, 3, 16, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    weighting = sd3_weighting(2, torch.float64).requires_grad_()  # its gradient too: the per-sample losses
    nudged = band_weights[:3] + (band_weights[3] + 1e-12,)
    fast, general = WaveletLoss(levels, band_weights)(pred, target, weighting), WaveletLoss(levels, nudged)(pred, target, weighting)
    torch.testing.assert_close(fast, general, rtol=1e-10, atol=0)
    g_fast, g_general = torch.autograd.grad(fast, (pred, weighting)), torch.autograd.grad(general, (pred, weighting))
    for a, b in zip(g_fast, g_general):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_loss_at_4k_latent_size_is_accurate():
    """float32 against float64 on the same inputs, within a bound that does not depend on a torch release.

    Bound: a pairwise (cascade) sum of n non-negative terms is within ceil(log2 n)·u of the exact sum, u = 2^-24
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §4.2); the loss chains at most four such
    error sources per coefficient (the difference, the transform, the squares, the per-sample sums), so its relative
    error is within 4·ceil(log2 n)·u: 4.8e-6 for n = 16 x 256 x 256. One sequential norm over a whole sample (the
    bug the row-wise norms avoid) is 2e-5 off here.
    """
    torch.manual_seed(1)
    pred, target = torch.randn(2, 16, 256, 256, requires_grad=True), torch.randn(2, 16, 256, 256)
    weighting = sd3_weighting(2)
    bound = 4 * math.ceil(math.log2(pred[0].numel())) * 2.0**-24
    for band_weights, levels in [((1, 2, 2, 2), 1), ((1, 2, 2, 2), 3), ((0.5, 1, 2, 3), 1), ((1, 1, 1, 1), 1)]:
        loss = WaveletLoss(levels, band_weights)
        value, ref = loss(pred, target, weighting), loss(pred.double(), target.double(), weighting.double())
        assert abs(value.item() - ref.item()) <= bound * ref.item(), (band_weights, levels)
        (grad,), (grad_ref,) = torch.autograd.grad(value, pred), torch.autograd.grad(ref, pred)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6 * grad_ref.abs().max().item())


def test_odd_size_loss_is_mse_of_edge_padded_error():
    """Documented odd-size behaviour: the last row / column is counted twice, so WLF != plain MSE there."""
    pred, target = torch.randn(2, 3, 9, 7, dtype=torch.float64), torch.randn(2, 3, 9, 7, dtype=torch.float64)
    wlf = WaveletLoss(1)(pred, target)
    padded = F.mse_loss(F.pad(pred, (0, 1, 0, 1), mode="replicate"), F.pad(target, (0, 1, 0, 1), mode="replicate"))
    torch.testing.assert_close(wlf, padded, rtol=1e-12, atol=0)
    assert abs(wlf.item() - F.mse_loss(pred, target).item()) > 1e-3


def test_weighting_shapes_and_scalar():
    pred, target = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    w = sd3_weighting(3)
    loss = WaveletLoss(2, (1, 2, 2, 2))
    ref = loss(pred, target, w)
    for shape in [(3,), (3, 1, 1), (3, 1, 1, 1)]:  # (B, 1, 1) is what Flux trainers get from n_dim=3 sigmas
        torch.testing.assert_close(loss(pred, target, w.reshape(shape)), ref)
    torch.testing.assert_close(loss(pred, target, torch.tensor(2.0)), 2 * loss(pred, target))
    with pytest.raises(ValueError, match="one weight per sample"):
        loss(pred, target, torch.ones(2, 1, 1, 1))


def test_autocast_bf16_forward_and_backward():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x, target = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    loss = WaveletLoss(2, (1, 2, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = conv(x)
        assert pred.dtype == torch.bfloat16
        value = loss(pred, target, sd3_weighting(2))
    assert value.dtype == torch.float32
    value.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    ref = loss(pred.detach().float(), target, sd3_weighting(2))  # same bf16 prediction, loss in float32
    torch.testing.assert_close(value.detach(), ref, rtol=1e-6, atol=0)


def authors_dwt(x):
    """The authors' DWTForward(J=1, mode="zero", wave="haar") re-implemented: pywt's Haar filter bank reversed and
    cast to x.dtype, one strided grouped conv along W, then one along H, bands LL, LH, HL, HH (even sizes)."""
    wavelet = pywt.Wavelet("haar")
    bank = torch.tensor([wavelet.dec_lo[::-1], wavelet.dec_hi[::-1]], dtype=x.dtype)  # (2 filters, 2 taps)
    C = x.shape[1]
    rows = F.conv2d(x, bank.view(2, 1, 1, 2).repeat(C, 1, 1, 1), stride=(1, 2), groups=C)
    both = F.conv2d(rows, bank.view(2, 1, 2, 1).repeat(2 * C, 1, 1, 1), stride=(2, 1), groups=2 * C)
    return both.unflatten(1, (C, 4)).unbind(2)


def test_authors_numerics_compute_the_coefficients_in_bf16_as_their_dwt_does():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 16, 12).bfloat16(), torch.randn(2, 4, 16, 12).bfloat16()
    weighting = torch.rand(2, 1, 1, 1) + 0.5
    ll, (lh, hl, hh) = haar_dwt2d_as_authors(pred)
    for ours, theirs in zip((ll, lh, hl, hh), authors_dwt(pred)):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    # Their loss: the four bands along channels, then the mean of w * (pred - target)^2 in fp32.
    bands = [torch.cat(authors_dwt(x), 1).float() for x in (pred, target)]
    theirs = trainer_mse(bands[0], bands[1], weighting)
    value = WaveletLoss(1, coefficient_dtype=torch.bfloat16)(pred, target, weighting)
    torch.testing.assert_close(value, theirs, rtol=1e-6, atol=0)
    exact = WaveletLoss(1)(pred, target, weighting)  # the default: the same bf16 inputs, the DWT in fp32
    assert 0 < abs(value - exact) / exact < 2**-7
    pred.requires_grad_(True)
    WaveletLoss(1, coefficient_dtype=torch.bfloat16)(pred, target, weighting).backward()
    assert pred.grad.dtype == torch.bfloat16 and pred.grad.abs().sum() > 0


def test_bad_inputs_speak_to_the_user():
    loss = WaveletLoss()
    with pytest.raises(ValueError, match="unpack Flux"):
        loss(torch.randn(2, 64, 64), torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="one \\(B, C, H, W\\) shape"):
        loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 6))
    with pytest.raises(ValueError, match="levels >= 1"):
        WaveletLoss(0)
    with pytest.raises(ValueError, match="four non-negative"):
        WaveletLoss(1, (1, 2, 2))


def test_parse_band_weights():
    assert parse_band_weights("1,2,2,2") == (1.0, 2.0, 2.0, 2.0)
    assert parse_band_weights(" 0.5, 1 ,1,1") == (0.5, 1.0, 1.0, 1.0)
    assert WaveletLoss(1, "1,2,2,2").band_weights == (1.0, 2.0, 2.0, 2.0)
    for bad in ["1,2,2", "1,2,2,2,2", "a,b,c,d", "1,-2,2,2", "0,0,0,0", "1,nan,1,1", ""]:
        with pytest.raises(argparse.ArgumentTypeError, match="LL,LH,HL,HH"):
            parse_band_weights(bad)
    parser = argparse.ArgumentParser()
    parser.add_argument("--wavelet_band_weights", type=parse_band_weights)
    assert parser.parse_args(["--wavelet_band_weights", "1,2,2,2"]).wavelet_band_weights == (1.0, 2.0, 2.0, 2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    pred, target = torch.randn(2, 4, 32, 32, requires_grad=True), torch.randn(2, 4, 32, 32)
    weighting = sd3_weighting(2)
    loss = WaveletLoss(2, (1, 2, 2, 2))
    cpu = loss(pred, target, weighting)
    (g_cpu,) = torch.autograd.grad(cpu, pred)
    pred_cuda = pred.detach().cuda().requires_grad_()
    gpu = loss(pred_cuda, target.cuda(), weighting.cuda())
    (g_gpu,) = torch.autograd.grad(gpu, pred_cuda)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-4, atol=1e-8)
    for a, b in zip(haar_dwt2d(pred.detach().cuda(), 2)[1], haar_dwt2d(pred.detach(), 2)[1]):
        torch.testing.assert_close(a.cpu(), b)


def test_bench_runs_small_and_prints_every_case(repo_root):
    """`python -m bench.bench_wavelet` end to end on a small latent: one JSON line per case, with its ratio and counts."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench_wavelet", "--shape", "2,4,32,32", "--repeats", "2", "--warmup", "1",
         "--threads", "1"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = {r["case"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert {"wlf_L1_w1111", "wlf_L1_w1222", "wlf_L3_w1222", "wlf_L1_w0.5,1,2,3", "explicit_autograd_L1_w1222"} <= set(records)
    assert all(r["ratio_vs_mse"] > 0 and r["shape"] == [2, 4, 32, 32] for r in records.values())
    # The equal-weight form is a handful of calls; the explicit transform plus autograd is many more.
    assert records["wlf_L1_w1111"]["aten_calls"] < records["wlf_L1_w1222"]["aten_calls"] < records["explicit_autograd_L1_w1222"]["aten_calls"]
