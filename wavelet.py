"""Haar DWT / IDWT on (B, C, H, W) tensors and the wavelet (WLF) loss of Diffusion-4K (PROTOCOL.md §3)."""
import argparse
import functools
import math

import torch
import torch.nn as nn

# Sub-bands are named <along W><along H>, as in pytorch_wavelets: LH = low-pass along W, high-pass along H,
# i.e. horizontal edges. Against pywt.dwt2(x, "haar") -> (cA, (cH, cV, cD)): LL = cA, LH = cH, HL = cV,
# HH = cD, with the same signs. One level, on the 2x2 block [[a, b], [c, d]]:
#   LL = (a + b + c + d) / 2   LH = (a + b - c - d) / 2   HL = (a - b + c - d) / 2   HH = (a - b - c + d) / 2
# i.e. low-pass (even + odd)/sqrt2, high-pass (even - odd)/sqrt2: the filter H = [-1, 1]/sqrt2 applied, as pywt
# applies it, as a convolution (the taps reversed).
# Odd sizes: the last row / column is repeated before the step. For a 2-tap filter that is exactly pywt's
# default "symmetric" mode, so odd sizes match pywt too.


def _pad_even(x):
    """Repeat the last row / column of x where H / W is odd (pywt's "symmetric" mode for Haar)."""
    if x.shape[-2] % 2:
        x = torch.cat([x, x[..., -1:, :]], -2)
    if x.shape[-1] % 2:
        x = torch.cat([x, x[..., -1:]], -1)
    return x


def haar_dwt2d(x, levels=1):
    """Haar DWT of x (B, C, H, W): [LL_J, (LH_J, HL_J, HH_J), ..., (LH_1, HL_1, HH_1)], pywt.wavedec2's layout."""
    if x.dim() != 4 or levels < 1:
        raise ValueError(f"haar_dwt2d expects a (B, C, H, W) tensor and levels >= 1, got {tuple(x.shape)}, {levels}")
    details = []
    for _ in range(levels):
        x = _pad_even(x)
        a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
        s0, s1, t0, t1 = a + b, c + d, a - b, c - d
        x = (s0 + s1) * 0.5
        details.append(((s0 - s1) * 0.5, (t0 + t1) * 0.5, (t0 - t1) * 0.5))
    return [x] + details[::-1]


def haar_idwt2d(coeffs, size=None):
    """Inverse of haar_dwt2d; `size` (H, W) crops the rows / columns that padding added to odd sizes."""
    x = coeffs[0]
    for lh, hl, hh in coeffs[1:]:
        x = x[..., : lh.shape[-2], : lh.shape[-1]]  # an odd-sized level's padded LL row / column (as pywt)
        s0, s1, t0, t1 = x + lh, x - lh, hl + hh, hl - hh
        a, b, c, d = (s0 + t0) * 0.5, (s0 - t0) * 0.5, (s1 + t1) * 0.5, (s1 - t1) * 0.5
        x = torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -3).flatten(-4, -3).flatten(-2)
    return x if size is None else x[..., : size[0], : size[1]]


def _sq_norms(x):
    """Per-sample sum of squares of x (B, ..., W), nothing the size of x written: the norm of each row, then a
    pairwise sum of their squares (one norm over a whole sample accumulates naively: 2e-5 off at 1M values)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1, x.shape[-1]), dim=-1).square().sum(-1)


class _ParsevalWLF(torch.autograd.Function):
    """The loss for equal detail weights (w_ll, w, w, w), any number of levels, sizes divisible by 2^levels.

    The Haar DWT is orthonormal (Parseval), so the detail bands of all levels hold ||d||^2 - ||LL_J||^2 and
        w_ll ||LL_J||^2 + w * sum_details ||band||^2 = w ||d||^2 + (w_ll - w) ||LL_J||^2,   d = pred - target,
    with LL_J = (2^J x 2^J block sums of d) / 2^J. Nothing but d and the block sums is computed, and the
    gradient 2 (w d + (w_ll - w) IDWT(LL_J)) (IDWT of a lone LL: nearest upsampling, / 2^J) is written straight
    into its buffer. Equal weights are w * MSE exactly (PROTOCOL.md §3), used as the computation."""

    @staticmethod
    def forward(ctx, pred, target, weights, w_ll, w, levels):
        diff = pred.to(weights.dtype) - target.to(weights.dtype)
        energy = _sq_norms(diff) * w
        blocks = None
        if w_ll != w:
            blocks = diff
            for _ in range(levels):  # 2^J x 2^J block sums (= 2^J LL_J): rows first, then column pairs
                even, odd = blocks.unflatten(-2, (blocks.shape[-2] // 2, 2)).unbind(-2)
                low = even + odd
                blocks = low[..., 0::2] + low[..., 1::2]
            energy = energy.add(_sq_norms(blocks), alpha=(w_ll - w) * 0.25**levels)
        ctx.w, ctx.correction, ctx.levels, ctx.dtypes = w, w_ll - w, levels, (pred.dtype, target.dtype)
        ctx.save_for_backward(diff, weights, blocks, energy)
        return torch.dot(energy, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diff, weights, blocks, energy = ctx.saved_tensors
        B, C, H, W = diff.shape
        scale = (weights * (2 * grad)).view(B, 1, 1, 1)  # 2 * d loss / d energy_b
        if blocks is None:
            grad_diff = diff * (scale * ctx.w)
        else:  # each block sum, scaled, repeated over its 2^J x 2^J pixels, plus w * d
            m = 2**ctx.levels
            grad_diff = torch.empty_like(diff)
            out, diff_rows, w_scale = grad_diff.view(B, C, H // m, m, W), diff.view(B, C, H // m, m, W), scale * ctx.w
            # The first row of each block gets the scaled block sums, each repeated over m columns; the other rows
            # are that row + w d, and the first row's own w d comes last: no temporary of the output's size.
            torch.mul(blocks.unsqueeze(-1).expand(*blocks.shape, m), (scale * (ctx.correction / m**2)).unsqueeze(-1),
                      out=out[:, :, :, 0].view(*blocks.shape, m))
            for i in range(1, m):
                torch.addcmul(out[:, :, :, 0], diff_rows[:, :, :, i], w_scale, out=out[:, :, :, i])
            out[:, :, :, 0].addcmul_(diff_rows[:, :, :, 0], w_scale)
        grad_pred = grad_diff.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_target = (-grad_diff).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        grad_weights = energy * grad if ctx.needs_input_grad[2] else None
        return grad_pred, grad_target, grad_weights, None, None, None


# The small constant tensors are made once per device and dtype: a host-to-GPU copy in every training step
# would be a synchronisation point.
@functools.lru_cache(maxsize=None)
def _row_signs(device, dtype):
    """[[1], [-1]]: the row step's even rows +/- odd rows, as a broadcastable tensor."""
    return torch.tensor([[1.0], [-1.0]], dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _band_constants(band_weights, device, dtype):
    """Weights as [row band, column band] for the last level and for the others (no LL), and M."""
    w_ll, w_lh, w_hl, w_hh = band_weights
    band_w = torch.tensor([[w_ll, w_hl], [w_lh, w_hh]], dtype=dtype, device=device)
    detail_w = band_w.clone()
    detail_w[0, 0] = 0.0  # a level's LL is only the next level's input, not a band of the loss
    cols = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype, device=device) * 0.5  # the column step, M
    return band_w, detail_w, cols


class _HaarRowGram(torch.autograd.Function):
    """One Haar level as the loss needs it: the row step R = (even rows +/- odd rows) of an even-sized x and,
    per sample and row band, the 2x2 Gram matrix G of R's column pairs (plus 2 * LL if asked for). The band
    energies are diag(M G M^T), M = [[1, 1], [1, -1]] / 2: the column step is never materialised."""

    @staticmethod
    def forward(ctx, x, need_ll):
        B, C, H, W = x.shape
        rows = x.unflatten(2, (H // 2, 2))
        r = x.new_empty(B, 2, C, H // 2, W)  # row band k first, so each (sample, band) is one contiguous block
        torch.add(rows[:, :, :, 0], rows[:, :, :, 1], out=r[:, 0])
        torch.sub(rows[:, :, :, 0], rows[:, :, :, 1], out=r[:, 1])
        pairs = r.view(B * 2 * C, -1, 2)  # one matmul per channel: more parallel and more accurate than one per band
        gram = torch.bmm(pairs.transpose(1, 2), pairs).view(B, 2, C, 2, 2).sum(2)
        ctx.save_for_backward(r)
        ll2 = torch.add(r[:, 0, ..., 0::2], r[:, 0, ..., 1::2]) if need_ll else None  # 2 * LL
        return gram, ll2

    @staticmethod
    def backward(ctx, grad_gram, grad_ll2):
        (r,) = ctx.saved_tensors
        B, _, C, h, W = r.shape
        sym = (grad_gram + grad_gram.transpose(-1, -2)).reshape(B * 2, 2, 2)
        grad_r = torch.bmm(r.view(B * 2, -1, 2), sym).view(B, 2, C, h, W)
        if grad_ll2 is not None:
            grad_r[:, 0].unflatten(-1, (W // 2, 2)).add_(grad_ll2.unsqueeze(-1))
        signs = _row_signs(r.device, r.dtype)
        grad_x = torch.addcmul(grad_r[:, 0].unsqueeze(3), grad_r[:, 1].unsqueeze(3), signs)
        return grad_x.view(B, C, 2 * h, W), None


def haar_dwt2d_as_authors(x, levels=1):
    """haar_dwt2d as the authors' pytorch_wavelets computes it in x's own dtype (bf16 under their autocast): along W,
    then along H, each output a 2-tap sum with the taps 1/sqrt2 rounded to x.dtype, products summed in fp32 and
    rounded once to x.dtype; odd sizes zero-padded (their mode="zero"). Same layout as haar_dwt2d."""
    tap = torch.tensor(2**-0.5, dtype=x.dtype).float()

    def step(x, dim):
        if x.shape[dim] % 2:
            x = torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 1))], dim)
        even, odd = (x[..., 0::2, :], x[..., 1::2, :]) if dim == -2 else (x[..., 0::2], x[..., 1::2])
        even, odd = even.float() * tap, odd.float() * tap
        return (even + odd).to(x.dtype), (even - odd).to(x.dtype)

    details = []
    for _ in range(levels):
        low_w, high_w = step(x, -1)
        (x, lh), (hl, hh) = step(low_w, -2), step(high_w, -2)
        details.append((lh, hl, hh))
    return [x] + details[::-1]


def parse_band_weights(text):
    """Parse "LL,LH,HL,HH" weights such as "1,2,2,2"; usable as an argparse `type=`."""
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 4 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise argparse.ArgumentTypeError(
            f"band weights must be four comma-separated non-negative numbers for the LL,LH,HL,HH sub-bands, "
            f"not all zero (e.g. --wavelet_band_weights 1,2,2,2); got {text!r}"
        )
    return weights


class WaveletLoss(nn.Module):
    """L_WLF = sum_b w_b sum_bands w_band ||DWT(pred - target)_band||^2 / (number of coefficients): the
    weighted mean over all sub-band coefficients. The LL weight applies to the final (coarsest) LL, the
    LH / HL / HH weights to the detail bands of every level. Equal weights 1 on even sizes == MSE exactly.

    coefficient_dtype (e.g. torch.bfloat16): the authors' numerics (PROTOCOL.md §4, Numerics): the coefficients of
    pred and target computed in that dtype (haar_dwt2d_as_authors), only their squared differences in fp32.
    """

    def __init__(self, levels=1, band_weights=(1.0, 1.0, 1.0, 1.0), coefficient_dtype=None):
        super().__init__()
        if isinstance(band_weights, str):
            band_weights = parse_band_weights(band_weights)
        if int(levels) != levels or levels < 1:
            raise ValueError(f"WaveletLoss needs levels >= 1 (an integer), got {levels!r}")
        band_weights = tuple(float(w) for w in band_weights)
        if len(band_weights) != 4 or min(band_weights) < 0:
            raise ValueError(f"band_weights must be four non-negative (LL, LH, HL, HH) weights, got {band_weights}")
        self.levels, self.band_weights, self.coefficient_dtype = int(levels), band_weights, coefficient_dtype

    def extra_repr(self):
        return f"levels={self.levels}, band_weights={self.band_weights}, coefficient_dtype={self.coefficient_dtype}"

    def forward(self, pred, target, weighting=None):
        """pred, target: (B, C, H, W), any float dtype; weighting: None, a scalar or one weight per sample."""
        if pred.shape != target.shape or pred.dim() != 4:
            raise ValueError(
                f"WaveletLoss needs pred and target of one (B, C, H, W) shape, got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}; unpack Flux's packed (B, tokens, 64) latents to (B, 16, H, W) first"
            )
        B, C, H, W = pred.shape
        dtype = torch.promote_types(pred.dtype, torch.float32)
        # One weight per sample, over the number of coefficients: the loss is sum_b weights_b * energy_b.
        if weighting is None:
            weights = torch.full((B,), 1.0 / (B * C * H * W), dtype=dtype, device=pred.device)
        else:
            weights = self._per_sample(weighting, B).to(pred.device, dtype).expand(B) / (B * C * H * W)
        w_ll, w_lh, w_hl, w_hh = self.band_weights
        with torch.autocast(pred.device.type, enabled=False):  # sums of squares must not run in bf16
            if self.coefficient_dtype is not None:
                return torch.dot(self._rounded_band_energies(pred, target), weights)
            if w_lh == w_hl == w_hh and H % 2**self.levels == 0 and W % 2**self.levels == 0:
                return _ParsevalWLF.apply(pred, target, weights, w_ll, w_lh, self.levels)
            # Unequal detail weights or padding at some level: every band's energy, from 2x2 Gram matrices.
            x = pred.to(dtype) - target.to(dtype)
            band_w, detail_w, cols = _band_constants(self.band_weights, x.device, dtype)
            per_sample, count, scale = 0.0, 0, 1.0
            for level in range(self.levels):
                last = level == self.levels - 1
                x = _pad_even(x)  # at level l, x = 2^l * LL_l: the 1/2 of each step is folded into `scale`
                gram, x_next = _HaarRowGram.apply(x, not last)
                energy = torch.einsum("mq,bkqr,mr->bkm", cols, gram, cols)  # (B, row band, col band)
                per_sample = per_sample + (energy * (band_w if last else detail_w)).sum((1, 2)) * scale
                count += x[0].numel() // 4 * (4 if last else 3)
                x, scale = x_next, scale / 4
            return torch.dot(per_sample, weights) * (C * H * W / count)

    def _rounded_band_energies(self, pred, target):
        """Per sample, sum_bands w_band ||band(pred) - band(target)||^2 * C*H*W / coefficients, the bands computed in
        coefficient_dtype as the authors did."""
        pred_bands, target_bands = (haar_dwt2d_as_authors(x.to(self.coefficient_dtype), self.levels)
                                    for x in (pred, target))
        pairs = [(self.band_weights[0], pred_bands[0], target_bands[0])]
        for pred_level, target_level in zip(pred_bands[1:], target_bands[1:]):
            pairs += zip(self.band_weights[1:], pred_level, target_level)
        per_sample = sum(w * (p.float() - t.float()).square().sum((1, 2, 3)) for w, p, t in pairs)
        count = sum(p[0].numel() for _, p, _ in pairs)
        return per_sample * (pred[0].numel() / count)

    @staticmethod
    def _per_sample(weighting, batch):
        """One weight per sample from a scalar or a (B, 1, 1, 1)-like tensor (compute_loss_weighting_for_sd3)."""
        weighting = torch.as_tensor(weighting)
        if weighting.numel() == 1:
            return weighting.reshape(1)
        if weighting.dim() >= 1 and weighting.shape[0] == batch and weighting.numel() == batch:
            return weighting.reshape(batch)
        raise ValueError(
            f"weighting must be one weight per sample, shape ({batch}, 1, 1, 1); got {tuple(weighting.shape)}"
        )
