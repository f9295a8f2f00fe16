"""OpenVLA (Prismatic VLM + action tokens), our own implementation of the openvla/openvla-7b checkpoint layout.

    pixel_values (B, 6, 224, 224) -> DINOv2 + SigLIP (timm), second-to-last block, prefix tokens dropped
                                  -> channel concat (B, 256, 1024 + 1152) -> MLP projector (B, 256, D)
    sequence = [<s>, 256 projected patches, rest of the prompt] -> Llama-2 (transformers) -> logits (B, S, 32064)

On disk (a local directory or a hub id): config.json (`model_type` "openvla", `text_config` as a diff against
LlamaConfig defaults, `norm_stats`), sharded safetensors + index (keys `vision_backbone.featurizer.*`,
`vision_backbone.fused_featurizer.*` with LayerScale stored as `ls{1,2}.scale_factor`, `projector.fc{1,2,3}.*`,
`language_model.*`), tokenizer files, preprocessor_config.json (`tvf_resize_params`, `tvf_normalize_params`).
`common/models/tiny.py` writes the same layout with tiny sizes, for tests and the CPU quickstart.
"""

import json
import os
from typing import Optional

import timm
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from common.dist import attn_implementation as choose_attn_implementation

# vision_backbone_id -> (timm model ids, image size); the ids OpenVLA checkpoints use.
VISION_BACKBONES = {
    "dinosiglip-vit-so-224px": (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"], 224),
    "dinosiglip-vit-so-384px": (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"], 384),
    "siglip-vit-so400m": (["vit_so400m_patch14_siglip_224"], 224),
    "dinov2-vit-l": (["vit_large_patch14_reg4_dinov2.lvd142m"], 224),
}
PROMPT = "In: What action should the robot take to {}?\nOut:"
INDEX_FILE, WEIGHTS_FILE = "model.safetensors.index.json", "model.safetensors"
# openvla-7b's tokenizer files. Training never changes the tokenizer, so a saved checkpoint carries these files
# byte for byte as they were loaded: the checkpoint then loads in the reference's own stack (transformers 4.40)
# as well as in ours, whatever layout the installed transformers would write.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class VisionBackbone(nn.Module):
    """One or two (fused) timm ViTs; each returns its second-to-last block's patch tokens, prefix tokens removed."""

    def __init__(self, timm_ids: list[str], image_size: int, overrides: list[dict]):
        super().__init__()
        make = lambda i: timm.create_model(
            timm_ids[i], pretrained=False, num_classes=0, img_size=image_size, **overrides[i]
        )
        self.featurizer = make(0)
        self.fused_featurizer = make(1) if len(timm_ids) == 2 else None
        self.embed_dim = sum(v.embed_dim for v in (self.featurizer, self.fused_featurizer) if v is not None)

    @staticmethod
    def _second_to_last(vit, images: torch.Tensor) -> torch.Tensor:
        take = [len(vit.blocks) - 2]
        return vit.forward_intermediates(
            images, indices=take, norm=False, stop_early=True, intermediates_only=True, output_fmt="NLC"
        )[0]

    def unused_prefixes(self) -> list[str]:
        """Submodules the forward never reaches (last block, final norm, pooling head): kept so checkpoints round-trip,
        but they get no gradient, so training must freeze them (DDP requires every trainable parameter to be used)."""
        names = []
        for name, vit in (("featurizer", self.featurizer), ("fused_featurizer", self.fused_featurizer)):
            if vit is not None:
                names += [
                    f"{name}.blocks.{len(vit.blocks) - 1}.",
                    f"{name}.norm.",
                    f"{name}.fc_norm.",
                    f"{name}.attn_pool.",
                    f"{name}.head.",
                ]
        return names

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3 or 6, H, W) -> (B, 256, embed_dim): with two featurizers, split the channels, concat the features."""
        if self.fused_featurizer is None:
            return self._second_to_last(self.featurizer, pixel_values)
        images, fused_images = pixel_values.split(3, dim=1)
        return torch.cat(
            [self._second_to_last(self.featurizer, images), self._second_to_last(self.fused_featurizer, fused_images)],
            2,
        )


class Projector(nn.Module):
    """fc1 -> GELU -> fc2 (-> GELU -> fc3 for fused backbones), with biases."""

    def __init__(self, fused: bool, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fused = fused
        hidden = 4 * vision_dim if fused else llm_dim
        self.fc1, self.fc2 = nn.Linear(vision_dim, hidden), nn.Linear(hidden, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim) if fused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.fc3(nn.functional.gelu(x)) if self.fused else x


class OpenVLA(nn.Module):
    def __init__(self, config: dict, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        backbone = config["vision_backbone_id"]
        if backbone not in VISION_BACKBONES:
            raise ValueError(
                f"config.json vision_backbone_id {backbone!r} is not supported; known: {list(VISION_BACKBONES)}"
            )
        timm_ids, image_size = VISION_BACKBONES[backbone]
        overrides = config.get("timm_model_overrides") or [{}] * len(timm_ids)  # only tiny test models set this
        self.vision_backbone = VisionBackbone(timm_ids, image_size, overrides)
        text_config = LlamaConfig(**config.get("text_config", {}))
        text_config._attn_implementation = attn_implementation
        fused = self.vision_backbone.fused_featurizer is not None
        self.projector = Projector(fused, self.vision_backbone.embed_dim, text_config.hidden_size)
        self.language_model = LlamaForCausalLM(text_config)
        # The tokenizer's vocabulary (32000) without the LM's padding rows (32064 = 32000 rounded up to 64).
        self.vocab_size = text_config.vocab_size - config.get("pad_to_multiple_of", 0)
        self.n_action_bins = config.get("n_action_bins", 256)

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 6, H, W) -> (B, 256, D)."""
        return self.projector(self.vision_backbone(pixel_values))

    def embed_multimodal(self, input_ids, attention_mask, pixel_values, text_embeds: Optional[torch.Tensor] = None):
        """Insert the projected patches right after <s> in a LEFT-padded batch.

        input_ids, attention_mask: (B, L), each row = [pads..., <s>, prompt...]. text_embeds (B, L, D) replaces the
        token embeddings when given (OFT puts zeros at its action placeholders).
        Returns inputs_embeds (B, L + P, D), attention_mask (B, L + P), position_ids (B, L + P)."""
        patches = self.patch_embeddings(pixel_values).to(self.language_model.dtype)  # (B, P, D)
        if text_embeds is None:
            text_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, D)
        B, L, D = text_embeds.shape
        P = patches.shape[1]
        j = torch.arange(L + P, device=input_ids.device)[None]  # (1, L + P) output positions
        pads = (L - attention_mask.sum(1))[:, None]  # (B, 1); <s> sits at index `pads`
        # Output position j reads: the padded text up to <s>, then patch j - pads - 1, then text j - P.
        source = torch.where(j <= pads, j, torch.where(j <= pads + P, L + j - pads - 1, j - P))
        embeds = torch.cat([text_embeds, patches], 1).gather(1, source[..., None].expand(B, L + P, D))
        mask = (j >= pads).long()
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        return embeds, mask, position_ids

    def forward(self, input_ids, attention_mask, pixel_values, **lm_kwargs):
        """Full logits (B, L + 256, V), as the reference implementation returns them."""
        embeds, mask, position_ids = self.embed_multimodal(input_ids, attention_mask, pixel_values)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **lm_kwargs)


def make_trainable(vla: OpenVLA, lora_rank: int, lora_alpha: int) -> Optional[LoraConfig]:
    """Choose what trains. lora_rank > 0: LoRA adapters (fp32, even over a bf16 base) on every nn.Linear of the VLA
    (vision, projector, LLM) except the LM head, as OpenVLA's own fine-tuning does; returns their config.
    lora_rank 0: every weight. Either way the vision layers the forward never reaches stay frozen (DDP requires every
    trainable parameter to receive a gradient)."""
    unreached = ["vision_backbone." + prefix for prefix in vla.vision_backbone.unused_prefixes()]
    reached = lambda name: not any(name.startswith(prefix) for prefix in unreached)
    if lora_rank == 0:
        for name, p in vla.named_parameters():
            p.requires_grad = reached(name)
        return None
    targets = [
        name
        for name, m in vla.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head") and reached(name + ".")
    ]
    config = LoraConfig(
        r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets, init_lora_weights="gaussian"
    )
    inject_adapter_in_model(config, vla)
    for name, p in vla.named_parameters():
        p.requires_grad = "lora_" in name
        if p.requires_grad:
            p.data = p.data.float()
    return config


def save_lora_adapter(vla: OpenVLA, config: LoraConfig, directory: str) -> None:
    """adapter_model.safetensors + adapter_config.json (peft's file names)."""
    save_file(get_peft_model_state_dict(vla), os.path.join(directory, "adapter_model.safetensors"))
    config.save_pretrained(directory)


def merge_lora(vla: OpenVLA) -> None:
    """W <- W + (alpha / r) B A in every adapted layer, then put the plain base layer back (the module tree and
    state-dict keys of the original checkpoint); peft's layer `merge` does the arithmetic."""
    for name, module in list(vla.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(vla.get_submodule(parent_name), child, module.get_base_layer())


def load_lora_adapter(vla: OpenVLA, directory: str) -> None:
    set_peft_model_state_dict(vla, load_file(os.path.join(directory, "adapter_model.safetensors")))


# ---------------------------------------------------------------------------------------------------------------
# Actions: 256 bins on the last 256 tokens of the tokenizer vocabulary
# ---------------------------------------------------------------------------------------------------------------
class ActionTokenizer:
    """token t -> bin d = vocab - 1 - t clipped to [0, 254] -> bin_centers[d] (the 255 midpoints of
    linspace(-1, 1, 256))."""

    def __init__(self, vocab_size: int, n_bins: int = 256):
        self.vocab_size, self.n_bins = vocab_size, n_bins
        self.first_token = vocab_size - n_bins  # action tokens are [first_token, vocab_size)
        self.bins = torch.linspace(-1.0, 1.0, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    def tokens_to_normalized(self, tokens: torch.Tensor) -> torch.Tensor:
        bins = (self.vocab_size - 1 - tokens).clamp(0, self.bin_centers.numel() - 1)
        return self.bin_centers.to(tokens.device)[bins]

    def normalized_to_tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Inverse map (as the reference tokenises demonstrations): bucketize into 1..256, token = vocab - bucket."""
        buckets = torch.bucketize(actions.clamp(-1.0, 1.0), self.bins.to(actions.device), right=True).clamp(
            1, self.n_bins
        )
        return self.vocab_size - buckets

    @staticmethod
    def normalize(actions: torch.Tensor, stats: dict) -> torch.Tensor:
        """n = clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) where mask, else a (the gripper): OpenVLA's
        BOUNDS_Q99 normalisation of model-convention actions (..., D)."""
        q01 = torch.as_tensor(stats["q01"], dtype=actions.dtype, device=actions.device)
        q99 = torch.as_tensor(stats["q99"], dtype=actions.dtype, device=actions.device)
        normalized = (2 * (actions - q01) / (q99 - q01 + 1e-8) - 1).clamp(-1, 1)
        return torch.where(torch.as_tensor(stats["mask"], device=actions.device), normalized, actions)

    @staticmethod
    def unnormalize(normalized: torch.Tensor, stats: dict, eps: float = 0.0) -> torch.Tensor:
        """a = 0.5 (n + 1)(q99 - q01 + eps) + q01 where mask, else n (the gripper). OFT checkpoints use eps 1e-8."""
        q01 = torch.as_tensor(stats["q01"], dtype=normalized.dtype, device=normalized.device)
        q99 = torch.as_tensor(stats["q99"], dtype=normalized.dtype, device=normalized.device)
        mask = torch.as_tensor(stats.get("mask", [True] * q01.numel()), device=normalized.device)
        return torch.where(mask, 0.5 * (normalized + 1) * (q99 - q01 + eps) + q01, normalized)


def action_stats(config: dict, unnorm_key: Optional[str], flag: str = "--unnorm-key") -> dict:
    """The checkpoint's `norm_stats[unnorm_key]["action"]` (q01, q99, mask), with a clear error on a bad key."""
    norm_stats = config.get("norm_stats") or {}
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(f"{flag} is required: the checkpoint has norm_stats for {sorted(norm_stats)}")
        unnorm_key = next(iter(norm_stats))
    if unnorm_key not in norm_stats:
        raise ValueError(
            f"{flag} {unnorm_key!r} is not in the checkpoint's norm_stats; choose one of {sorted(norm_stats)}"
        )
    return norm_stats[unnorm_key]["action"]


# ---------------------------------------------------------------------------------------------------------------
# Processor: images -> pixel_values (B, 6, 224, 224); instructions -> left-padded prompt ids ending in "▁"
# ---------------------------------------------------------------------------------------------------------------
class OpenVLAProcessor:
    def __init__(self, tokenizer, preprocessor_config: dict, tokenizer_files: Optional[dict[str, bytes]] = None):
        self.tokenizer, self.preprocessor_config = tokenizer, preprocessor_config
        self.tokenizer_files = tokenizer_files  # {file name: bytes} as loaded; None: written by save_pretrained
        if preprocessor_config.get("image_resize_strategy", "resize-naive") != "resize-naive":
            raise ValueError(
                f"image_resize_strategy {preprocessor_config['image_resize_strategy']!r}: "
                "only 'resize-naive' is supported"
            )
        self.image_size = list(preprocessor_config["tvf_resize_params"][0]["size"])
        # The bf16-rounded constants the reference normalises with, one (mean, std) per featurizer.
        norm = preprocessor_config["tvf_normalize_params"]
        self.mean = torch.tensor([c for p in norm for c in p["mean"]]).view(1, -1, 1, 1)
        self.std = torch.tensor([c for p in norm for c in p["std"]]).view(1, -1, 1, 1)
        self.n_copies = len(norm)
        self.space_token = tokenizer.convert_tokens_to_ids("▁")  # 29871 for Llama-2: the answer starts after it

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3 * n_featurizers, 224, 224): bicubic antialiased resize on uint8 (as PIL
        does), then each featurizer's normalisation, channel-stacked."""
        x = images.permute(0, 3, 1, 2)
        if list(x.shape[-2:]) != self.image_size:
            x = TF.resize(x, self.image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = (x.float() / 255.0).repeat(1, self.n_copies, 1, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def prompt_ids(self, instructions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, L) ids and mask of "<s>In: What action should the robot take to {instruction}?\\nOut:▁"."""
        rows = []
        for text in instructions:
            ids = self.tokenizer(PROMPT.format(text.lower()), add_special_tokens=True)["input_ids"]
            if ids[-1] != self.space_token:
                ids.append(self.space_token)
            rows.append(ids)
        L = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device=device)
        return input_ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving the real layout
# ---------------------------------------------------------------------------------------------------------------
def resolve_model_path(path: str, flag: str = "--model-path") -> str:
    """A local directory, or a hub id downloaded (or found in the cache) with huggingface_hub."""
    if os.path.isdir(path):
        local = path
    elif os.path.exists(path):
        raise ValueError(f"{flag} {path!r} is a file; pass the checkpoint directory (with config.json)")
    else:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(path)
        except Exception as e:
            raise FileNotFoundError(
                f"{flag} {path!r}: no such directory, and it could not be fetched from the hub ({e})"
            ) from e
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(f"{flag} {path!r} has no config.json: not a Hugging Face checkpoint directory")
    return local


def read_openvla_config(path: str, flag: str = "--model-path") -> dict:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "openvla" and "OpenVLAForActionPrediction" not in config.get("architectures", []):
        raise ValueError(
            f"{flag} {path!r} is not an OpenVLA checkpoint: config.json has model_type {config.get('model_type')!r} "
            "(expected 'openvla', architectures ['OpenVLAForActionPrediction'])"
        )
    return config


# Module names equal the checkpoint keys, except timm's LayerScale `gamma`, which the reference stores as
# `scale_factor` (transformers renames parameters called gamma on load).
def _to_checkpoint_key(name: str) -> str:
    return name.replace(".ls1.gamma", ".ls1.scale_factor").replace(".ls2.gamma", ".ls2.scale_factor")


def _from_checkpoint_key(key: str) -> str:
    return key.replace(".ls1.scale_factor", ".ls1.gamma").replace(".ls2.scale_factor", ".ls2.gamma")


def load_state_dict_files(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        shards = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{path!r} has neither {INDEX_FILE} nor {WEIGHTS_FILE}")
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state


def load_openvla(
    path: str, device="cpu", dtype=torch.float32, attn_implementation: Optional[str] = None, flag: str = "--model-path"
):
    """Load config, weights, tokenizer and image preprocessing from an openvla-7b style directory or hub id.
    attn_implementation None: flash-attention 2 on a GPU when installed, else SDPA."""
    path = resolve_model_path(path, flag)
    config = read_openvla_config(path, flag)
    with torch.device("meta"):
        model = OpenVLA(config, attn_implementation or choose_attn_implementation(torch.device(device)))
    state = {_from_checkpoint_key(k): v for k, v in load_state_dict_files(path).items()}
    model.load_state_dict(state, strict=True, assign=True)
    llm = model.language_model.model
    llm.rotary_emb = None  # RoPE frequencies are a non-persistent buffer, still on the meta device: rebuilt below
    model = model.to(device=device, dtype=dtype)
    with torch.device(device):  # float32 even in a bf16 model, as transformers keeps it
        llm.rotary_emb = LlamaRotaryEmbedding(llm.config)
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        # LlamaTokenizer, the class openvla-7b's tokenizer_config.json names (AutoTokenizer would read config.json's
        # auto_map and ask whether to run the checkpoint's own code).
        processor = OpenVLAProcessor(LlamaTokenizer.from_pretrained(path), json.load(f), read_tokenizer_files(path))
    return model, processor


def read_tokenizer_files(path: str) -> dict[str, bytes]:
    files = {}
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                files[name] = f.read()
    return files


def save_openvla(
    model: OpenVLA,
    processor: OpenVLAProcessor,
    path: str,
    max_shard_bytes: int = 5 << 30,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write config.json, sharded safetensors + index, tokenizer and preprocessor_config.json in the reference layout.
    state_dict replaces model.state_dict() (a sharded model's weights gathered with common.fsdp.full_state_dict)."""
    os.makedirs(path, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    state = {_to_checkpoint_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(processor.preprocessor_config, f, indent=2)
    if processor.tokenizer_files:
        for name, data in processor.tokenizer_files.items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
    else:
        processor.tokenizer.save_pretrained(path)
