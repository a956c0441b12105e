"""A tiny diffusers-format Stable Diffusion directory written offline (unet/, vae/, text_encoder/, tokenizer/)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SD_TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 2,
    "norm_num_groups": 8,
}
SD_TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (16, 32), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 8, "sample_size": 16, "scaling_factor": 0.18215,
}


def _byte_alphabet() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values (GPT-2's bytes_to_unicode, written out)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of a small CLIP BPE (bytes, bytes at word end, a few merges) + tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = [("a", "n</w>"), ("o", "f</w>"), ("o", "l"), ("ol", "d</w>"), ("y", "e"), ("ye", "a")]
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))


def write_tiny_sd(root: Path, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Save a tiny SD directory with `save_pretrained`; returns the saved state_dicts per part."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tokenizer(root / "tokenizer")
    vocab = len(json.loads((root / "tokenizer" / "vocab.json").read_text()))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD_TINY_UNET)
    vae = AutoencoderKL(**SD_TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    with torch.no_grad():  # a non-zero conv_in bias everywhere, so "unchanged output" is a real check
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
            for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
