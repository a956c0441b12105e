"""Plug-and-play feature injection between the structure LDM and the prompt LDM (Diff-X, papers/004).

At every denoising step the structure LDM (fed the inverted latent of the baseline radiograph, its
prompt and its low-resolution copy) runs first; its decoder ResNet output and self-attention
queries/keys at the injection layer are recorded and then replace the prompt LDM's at the same
place (Tumanyan et al., "Plug-and-Play Diffusion Features", CVPR 2023; thesis Methods 6).

Which layer is "the fifth decoder block": diffusers' SD decoder is ``unet.up_blocks[0..3]``, each with
``layers_per_block + 1 = 3`` ResNets (``up_blocks[i].resnets[j]``); blocks 1-3 also have one
transformer after each ResNet (``up_blocks[i].attentions[j]``, self-attention =
``.transformer_blocks[0].attn1``). Flattened in forward order this is 12 decoder layers, the first
three ResNet-only and the other nine ResNet + attention, the thesis's "three Resnet blocks and nine
Resnet-attention blocks". Plug-and-Play's reference code numbers these layers from 0: its "layer 4"
is ``up_blocks[1].resnets[1]`` and its self-attention layers 4-11 start at ``up_blocks[1].attentions[1]``.
The thesis moved the injection one layer later ("the fifth block"), so the default ``layer = 5`` is
``up_blocks[1].resnets[2]`` and ``up_blocks[1].attentions[2].transformer_blocks[0].attn1`` (at 1/4 of
the latent resolution: 16 x 16 for 64 x 64 latents). `decoder_site` maps any layer number for any
UNet built by `raypipe.models.ldm.unet`.

Attention goes through a custom processor (`InjectionAttnProcessor`) installed with
``unet.set_attn_processor``; that call empties the dict it is given, so a copy is passed and this
module keeps its own references (to restore the originals in `PlugAndPlay.remove`). ResNet features
go through forward hooks on ``up_blocks[i].resnets[j]``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_INJECTION_LAYER", "DecoderSite", "InjectionAttnProcessor", "PlugAndPlay", "decoder_site",
           "decoder_sites"]

DEFAULT_INJECTION_LAYER = 5


@dataclass(frozen=True)
class DecoderSite:
    """One decoder layer: its flat index, ``up_blocks[block].resnets[index]`` and its self-attention (or None)."""

    layer: int
    block: int
    index: int
    resnet: nn.Module
    self_attention: nn.Module | None
    attention_name: str | None  # key in ``unet.attn_processors``


def decoder_sites(unet: nn.Module) -> list[DecoderSite]:
    """Every decoder layer of a diffusers UNet in forward order (see module docstring)."""
    sites: list[DecoderSite] = []
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            attn, name = None, None
            if attentions is not None and j < len(attentions):
                attn = attentions[j].transformer_blocks[0].attn1
                name = f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.processor"
            sites.append(DecoderSite(len(sites), i, j, resnet, attn, name))
    return sites


def decoder_site(unet: nn.Module, layer: int) -> DecoderSite:
    """The decoder layer numbered `layer` (0-based, Plug-and-Play numbering)."""
    sites = decoder_sites(unet)
    if not 0 <= layer < len(sites):
        raise ValueError(f"decoder layer {layer} out of range: this UNet has {len(sites)} decoder layers")
    return sites[layer]


def _match_batch(stored: Tensor, batch: int) -> Tensor:
    """Broadcast recorded features (batch 1, or the same batch) to the target's batch."""
    if stored.shape[0] == batch:
        return stored
    if stored.shape[0] == 1:
        return stored.expand(batch, *stored.shape[1:])
    if batch % stored.shape[0] == 0:
        return stored.repeat_interleave(batch // stored.shape[0], dim=0)
    raise ValueError(f"cannot inject features of batch {stored.shape[0]} into batch {batch}")


class InjectionAttnProcessor:
    """Scaled-dot-product attention that records (source) or replaces (target) its queries and keys."""

    def __init__(self, controller: "PlugAndPlay", key: str, role: Literal["source", "target"]) -> None:
        self.controller, self.key, self.role = controller, key, role

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """Attention as diffusers' AttnProcessor2_0, with the query/key swap in the middle."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        ctl = self.controller
        if ctl.enabled and self.role == "source":
            ctl.features[f"q:{self.key}"] = query.detach()
            ctl.features[f"k:{self.key}"] = key.detach()
        elif ctl.enabled and ctl.inject_attention and self.role == "target":
            query = ctl.recorded(f"q:{self.key}", batch).to(query.dtype)
            key = ctl.recorded(f"k:{self.key}", batch).to(key.dtype)
            ctl.injections[f"attention:{self.key}"] += 1

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PlugAndPlay:
    """Wires the structure UNet (source) to the prompt UNet (target) at the chosen decoder layers.

    Installed once; does nothing until ``enabled`` is set (the pipeline enables it for Diff-X
    sampling and leaves it off for the single-LDM sampler). While enabled, every source forward
    records and every target forward injects, so the source must run first at each step.
    ``inject_resnet`` / ``inject_attention`` switch the two kinds per step (Plug-and-Play's
    injection schedules); ``injections`` counts what was replaced, for tests and logs.
    """

    def __init__(
        self,
        source: nn.Module,
        target: nn.Module,
        resnet_layers: Sequence[int] = (DEFAULT_INJECTION_LAYER,),
        attention_layers: Sequence[int] = (DEFAULT_INJECTION_LAYER,),
    ) -> None:
        self.source, self.target = source, target
        self.enabled = False
        self.inject_resnet = True
        self.inject_attention = True
        self.features: dict[str, Tensor] = {}
        self.owner: Tensor | None = None  # source row of each target sample (batched requests); None: broadcast
        self.injections: dict[str, int] = {}
        self._handles: list[Any] = []
        self._original: dict[int, dict[str, Any]] = {}
        self._processors: dict[int, dict[str, Any]] = {}
        self.resnet_layers = tuple(int(x) for x in resnet_layers)
        self.attention_layers = tuple(int(x) for x in attention_layers)
        for layer in self.resnet_layers:
            src, tgt = decoder_site(source, layer), decoder_site(target, layer)
            self._handles.append(src.resnet.register_forward_hook(self._record_hook(f"resnet:{layer}")))
            self._handles.append(tgt.resnet.register_forward_hook(self._inject_hook(f"resnet:{layer}")))
            self.injections[f"resnet:{layer}"] = 0
        if self.attention_layers:
            for unet, role in ((source, "source"), (target, "target")):
                self._install_processors(unet, role)

    def _install_processors(self, unet: nn.Module, role: Literal["source", "target"]) -> None:
        """Swap in `InjectionAttnProcessor` at the chosen self-attentions, keeping the other processors."""
        current = dict(unet.attn_processors)
        self._original[id(unet)] = dict(current)
        ours: dict[str, Any] = {}
        for layer in self.attention_layers:
            site = decoder_site(unet, layer)
            if site.attention_name is None:
                raise ValueError(f"decoder layer {layer} has no self-attention (ResNet-only up block)")
            ours[site.attention_name] = InjectionAttnProcessor(self, str(layer), role)
            self.injections[f"attention:{layer}"] = 0
        current.update(ours)
        self._processors[id(unet)] = ours  # our references: set_attn_processor empties the dict it gets
        unet.set_attn_processor(dict(current))

    def _record_hook(self, key: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if self.enabled:
                self.features[key] = output.detach()

        return hook

    def _inject_hook(self, key: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
            if not (self.enabled and self.inject_resnet):
                return None
            self.injections[key] += 1
            return self.recorded(key, output.shape[0]).to(output.dtype)

        return hook

    def recorded(self, key: str, batch: int) -> Tensor:
        """The recorded source features for a target batch: rows picked by `owner` when set, else broadcast.

        `owner[k]` is the source row (the baseline image) of target sample k, so one structure forward
        over several images can feed one prompt forward over all their samples; a target batch that is
        a whole multiple of `owner` (classifier-free guidance doubles it) repeats it.
        """
        stored = self.features[key]
        owner = self.owner
        if owner is not None and stored.shape[0] > 1 and batch % len(owner) == 0:
            return stored.index_select(0, owner.to(stored.device).repeat(batch // len(owner)))
        return _match_batch(stored, batch)

    def reset(self) -> None:
        """Forget recorded features and injection counts (between patients)."""
        self.features.clear()
        for k in self.injections:
            self.injections[k] = 0

    def remove(self) -> None:
        """Remove the hooks and restore the UNets' original attention processors."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for unet in (self.source, self.target):
            if id(unet) in self._original:
                unet.set_attn_processor(dict(self._original.pop(id(unet))))
        self.enabled = False
        self.reset()

