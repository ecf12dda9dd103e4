"""The embedded default: a small text-conditional rectified-flow model.

A pixel-space U-Net that predicts the velocity ``v = noise - x0`` at time ``t``
(t = 1 is pure noise, as in SD3 and FlowEdit). The empty caption is the
unconditional branch that classifier-free guidance needs (trained by condition
dropout).

Two caption encoders:

* ``bag_of_words`` (version 1): the mean of word embeddings. Extra attribute
  words dilute the others (a long caption barely says "man" any more).
* ``attribute_slots`` (version 2): a caption is a comma-separated list of
  phrases, each naming one identity attribute ("blond hair", "wide face",
  "green background"); every attribute has its own embedding slot, the slots are
  concatenated, and an unnamed attribute takes the slot's "unspecified" value.
  Nothing is averaged away, so a caption can describe a whole new identity.

Version 2 also takes an optional **erythema map** as a spatial input (two
channels: the map, and a flag that says whether it is known), so a new identity
can be drawn with the patient's erythema exactly where it was.

The 64x64 RGB image is folded losslessly to 32x32x12 (pixel unshuffle) so the
network works at a quarter of the pixels with no information lost.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Every word the clinic's captions use. Unknown words in a prompt are ignored
#: (the caller is warned by :func:`unknown_words`).
VOCABULARY = (
    "photo", "of", "a", "woman", "man", "person", "with", "facial", "erythema", "clear",
    "healthy", "skin", "light", "medium", "dark", "black", "brown", "blond", "red", "gray",
    "hair", "large", "small", "ears", "thick", "thin", "brows", "full", "face", "periocular",
    "close-up", "beard", "long", "short",
)
_WORD = re.compile(r"[a-z\-]+")

#: Version 2: every identity attribute the synthetic clinic varies, with the
#: phrases that name its values. Index 0 of every slot means "unspecified".
ATTRIBUTE_SLOTS: dict[str, tuple[str, ...]] = {
    "sex": ("woman", "man", "person"),
    "state": ("with facial erythema", "with clear, healthy skin"),
    "skin": ("light skin", "medium skin", "dark skin"),
    "hair_colour": ("black hair", "brown hair", "blond hair", "red hair", "gray hair"),
    "hair_length": ("short hair", "long hair"),
    "beard": ("clean-shaven", "beard"),
    "ears": ("small ears", "large ears"),
    "brows": ("thin brows", "thick brows"),
    "eyes": ("brown eyes", "blue eyes", "green eyes", "hazel eyes"),
    "eye_size": ("small eyes", "large eyes"),
    "eye_spacing": ("close-set eyes", "mid-set eyes", "wide-set eyes"),
    "face": ("narrow face", "medium face", "wide face"),
    "jaw": ("round jaw", "square jaw"),
    "hairline": ("low hairline", "middle hairline", "high hairline"),
    "lips": ("pale lips", "red lips"),
    "background": (
        "dark background", "blue background", "green background", "cyan background",
        "red background", "purple background", "yellow background", "light background",
    ),
    "earrings": ("no earrings", "gold earrings", "red earrings"),
    "piercing": ("no piercing", "nose piercing", "brow piercing"),
    "view": ("full face", "periocular close-up"),
}
_PHRASE_TO_SLOT = {phrase: (slot, i + 1) for slot, phrases in ATTRIBUTE_SLOTS.items()
                   for i, phrase in enumerate(phrases) if slot != "sex"}


def caption_slots(prompt: str) -> tuple[list[int], list[str]]:
    """Slot values (0 = unspecified) of a version-2 caption, and the phrases it
    could not place. The first phrase is ``photo of a <sex> <state>``."""
    values = [0] * len(ATTRIBUTE_SLOTS)
    names = list(ATTRIBUTE_SLOTS)
    unknown: list[str] = []
    text = prompt.lower().strip()
    for state_index, state in enumerate(ATTRIBUTE_SLOTS["state"]):
        if state in text:
            values[names.index("state")] = state_index + 1
            text = text.replace(state, ",")
    for phrase in (p.strip() for p in text.split(",")):
        if not phrase:
            continue
        if phrase.startswith("photo of a"):
            sex = phrase.removeprefix("photo of a").strip()
            if sex in ATTRIBUTE_SLOTS["sex"]:
                values[names.index("sex")] = ATTRIBUTE_SLOTS["sex"].index(sex) + 1
            elif sex:
                unknown.append(sex)
            continue
        if phrase in _PHRASE_TO_SLOT:
            slot, value = _PHRASE_TO_SLOT[phrase]
            values[names.index(slot)] = value
        else:
            unknown.append(phrase)
    return values, unknown


def tokenize(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


def unknown_words(prompt: str) -> list[str]:
    return [w for w in tokenize(prompt) if w not in VOCABULARY]


@dataclass
class FlowUNetConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (2,)
    embed_dim: int = 128
    vocabulary: tuple[str, ...] = field(default=VOCABULARY)
    #: bag_of_words (version 1) | attribute_slots (version 2)
    conditioning: str = "bag_of_words"
    #: width of one attribute slot's embedding (attribute_slots only)
    slot_dim: int = 32
    #: erythema map input channels: 0 (none) or 2 (map, known flag)
    spatial_channels: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FlowUNetConfig:
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(ATTRIBUTE_SLOTS) if self.conditioning == "attribute_slots" else ()


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class Attention(nn.Module):
    def __init__(self, c: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class FlowUNet(nn.Module):
    """Velocity model v(x_t, t, caption)."""

    def __init__(self, config: FlowUNetConfig) -> None:
        super().__init__()
        self.config = config
        e = config.embed_dim
        if config.conditioning == "bag_of_words":
            self.word_index = {w: i + 1 for i, w in enumerate(config.vocabulary)}  # 0 = padding
            self.word_embed = nn.Embedding(len(config.vocabulary) + 1, e, padding_idx=0)
            self.null_embed = nn.Parameter(torch.zeros(e))
        elif config.conditioning == "attribute_slots":
            self.slot_embed = nn.ModuleList(
                nn.Embedding(len(ATTRIBUTE_SLOTS[name]) + 1, config.slot_dim) for name in config.slot_names
            )
            self.slot_proj = nn.Linear(len(config.slot_names) * config.slot_dim, e)
        else:
            raise ValueError(f"unknown conditioning {config.conditioning!r}: bag_of_words or attribute_slots")
        if config.spatial_channels not in (0, 2):
            raise ValueError("spatial_channels must be 0 or 2 (erythema map, known flag)")
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.cond_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))

        chans = config.channels
        self.stem = nn.Conv2d(4 * (3 + config.spatial_channels), chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        skips = [chans[0]]
        c = chans[0]
        for level, c_out in enumerate(chans):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(c, c_out, e))
                self.down_attn.append(Attention(c_out) if level in config.attention_levels else nn.Identity())
                c = c_out
                skips.append(c)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                self.down_attn.append(nn.Identity())
                skips.append(c)
        self.mid1 = ResBlock(c, c, e)
        self.mid_attn = Attention(c)
        self.mid2 = ResBlock(c, c, e)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for level in reversed(range(len(chans))):
            c_out = chans[level]
            for _ in range(config.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), c_out, e))
                self.up_attn.append(Attention(c_out) if level in config.attention_levels else nn.Identity())
                c = c_out
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up_attn.append(nn.Identity())
        self.out_norm = nn.GroupNorm(8, c)
        self.out = nn.Conv2d(c, 12, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # -- captions --------------------------------------------------------------------
    def caption_tokens(self, prompts: list[str]) -> torch.Tensor:
        """Version 1: word indices, padded with 0, shape (B, L). Version 2: slot
        values, shape (B, number of slots)."""
        if self.config.conditioning == "attribute_slots":
            rows = [caption_slots(p)[0] for p in prompts]
            return torch.tensor(rows, dtype=torch.long, device=self.slot_proj.weight.device)
        ids = [[self.word_index[w] for w in tokenize(p) if w in self.word_index] for p in prompts]
        width = max(1, max(len(i) for i in ids))
        out = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        return out.to(self.null_embed.device)

    def encode_captions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Version 1: mean of the word embeddings, the empty caption gets the
        learned null. Version 2: the slots' embeddings side by side, projected."""
        if self.config.conditioning == "attribute_slots":
            slots = [embed(tokens[:, i]) for i, embed in enumerate(self.slot_embed)]
            return self.slot_proj(torch.cat(slots, dim=1))
        counts = (tokens > 0).sum(1, keepdim=True)
        summed = self.word_embed(tokens).sum(1)
        mean = summed / counts.clamp(min=1)
        return torch.where(counts > 0, mean, self.null_embed.expand_as(mean))

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, caption_embeds: torch.Tensor,
                spatial: torch.Tensor | None = None) -> torch.Tensor:
        """``spatial`` (B, 2, H, W): erythema map and known flag; None = unknown."""
        emb = self.time_mlp(_timestep_embedding(t, self.config.embed_dim)) + self.cond_mlp(caption_embeds)
        if self.config.spatial_channels:
            if spatial is None:
                spatial = x.new_zeros((x.shape[0], self.config.spatial_channels, *x.shape[2:]))
            x = torch.cat([x, spatial.to(x.dtype)], dim=1)
        elif spatial is not None:
            raise ValueError("this model takes no erythema map (spatial_channels=0)")
        h = self.stem(F.pixel_unshuffle(x, 2))
        hs = [h]
        for block, attn in zip(self.down, self.down_attn):
            h = attn(block(h, emb)) if isinstance(block, ResBlock) else block(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block, attn in zip(self.up, self.up_attn):
            if isinstance(block, ResBlock):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            else:
                h = block(h)
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), 2)


def save_flow_unet(model: FlowUNet, folder: str | Path, weights_name: str = "flow_unet.safetensors") -> None:
    """Save weights (safetensors) and config (JSON) atomically into ``folder``."""
    from safetensors.torch import save_file

    from common.io import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{weights_name}.partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_bytes(folder / weights_name, tmp.read_bytes())
    tmp.unlink()
    atomic_write_text(folder / "flow_unet.json", model.config.to_json())


def load_flow_unet(folder: str | Path, weights_name: str = "flow_unet.safetensors") -> FlowUNet:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = FlowUNetConfig.from_json((folder / "flow_unet.json").read_text())
    model = FlowUNet(config)
    model.load_state_dict(load_file(str(folder / weights_name)))
    return model.eval()
