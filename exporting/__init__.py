"""Export a fine-tuned model to the single files other tools load (export.py is the command line):
    layouts       where each diffusers tensor goes in the SD3 / Flux original layouts and the LDM VAE layout
    tensor_files  safetensors and GGUF files read and written one tensor at a time
    transformer   what --checkpoint_path stands for; the original, diffusers and GGUF formats
    adapters      LoRA adapters: reading, fusing, the comfy and kohya forms
    vae           the F=16 VAE with its factor and decode mode in the file's metadata
"""
