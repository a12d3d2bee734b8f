"""Diffusion-4K's ComfyUI nodes for the F=16 VAE (docs/comfyui.md): "VAE Decode (F=16, Diffusion-4K)" with the
decode modes of --vae_mode, "VAE Encode (F=16)" and "Empty Latent (F=16)". They use the repository's own
partitioned_vae.py, found from this folder's location; ComfyUI itself is not needed to import them."""
from .nodes import EmptyLatentF16, VAEDecodeF16, VAEEncodeF16

NODE_CLASS_MAPPINGS = {
    "Diffusion4K_VAEDecodeF16": VAEDecodeF16,
    "Diffusion4K_VAEEncodeF16": VAEEncodeF16,
    "Diffusion4K_EmptyLatentF16": EmptyLatentF16,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Diffusion4K_VAEDecodeF16": "VAE Decode (F=16, Diffusion-4K)",
    "Diffusion4K_VAEEncodeF16": "VAE Encode (F=16)",
    "Diffusion4K_EmptyLatentF16": "Empty Latent (F=16)",
}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
