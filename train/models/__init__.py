"""Models: Haar DWT module, quantizers, transformer blocks, tokenizers (SIT / ViT-VQ)."""
