"""The OpenVLA implementation: on-disk layout, save/load round trip, and the reference's conventions."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from common.models.openvla import (
    PROMPT,
    TOKENIZER_FILES,
    ActionTokenizer,
    action_stats,
    load_openvla,
    read_openvla_config,
    save_openvla,
)


def test_checkpoint_layout_matches_openvla_7b(tiny_openvla):
    config = json.load(open(os.path.join(tiny_openvla, "config.json")))
    assert config["model_type"] == "openvla" and config["architectures"] == ["OpenVLAForActionPrediction"]
    assert config["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert config["text_config"]["vocab_size"] % config["pad_to_multiple_of"] == 0
    index = json.load(open(os.path.join(tiny_openvla, "model.safetensors.index.json")))
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys  # LayerScale stored as scale_factor
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in keys  # SigLIP's MAP head
    assert not any(k.endswith(".gamma") for k in keys)
    assert {
        "projector.fc1.weight",
        "projector.fc3.bias",
        "language_model.lm_head.weight",
        "language_model.model.embed_tokens.weight",
    } <= keys
    pre = json.load(open(os.path.join(tiny_openvla, "preprocessor_config.json")))
    assert pre["tvf_normalize_params"][0]["mean"] == [0.484375, 0.455078125, 0.40625]


def test_save_load_round_trip_gives_identical_logits(tiny_openvla, tmp_path):
    model, processor = load_openvla(tiny_openvla)
    ids, mask = processor.prompt_ids(
        ["push the cube to the goal region", "stack the red cube on top of the green cube"]
    )
    pixels = processor.preprocess_images(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    with torch.no_grad():
        before = model(ids, mask, pixels).logits
    save_openvla(model, processor, str(tmp_path / "copy"), max_shard_bytes=1 << 19)
    reloaded, _ = load_openvla(str(tmp_path / "copy"))
    with torch.no_grad():
        after = reloaded(ids, mask, pixels).logits
    assert before.shape == (2, ids.shape[1] + 256, model.language_model.config.vocab_size)
    assert torch.equal(before, after)
    original = {}
    for f in os.listdir(tiny_openvla):
        if f.endswith(".safetensors"):
            original.update(load_file(os.path.join(tiny_openvla, f)))
    copied = {}
    for f in os.listdir(tmp_path / "copy"):
        if f.endswith(".safetensors"):
            copied.update(load_file(os.path.join(tmp_path / "copy", f)))
    assert original.keys() == copied.keys()
    for name in TOKENIZER_FILES:  # the tokenizer files travel byte for byte, whatever transformers would write
        assert os.path.isfile(tmp_path / "copy" / name) == os.path.isfile(os.path.join(tiny_openvla, name))
        if os.path.isfile(os.path.join(tiny_openvla, name)):
            assert (tmp_path / "copy" / name).read_bytes() == open(os.path.join(tiny_openvla, name), "rb").read()


# Prompt ids of the tiny tokenizer's files as transformers 4.57.1 gives them (where tokenizer.model loads as
# LlamaTokenizerFast, the reference's stack); transformers 5 converts the same sentencepiece file itself.
IDS_UNDER_TRANSFORMERS_4 = {
    "push the cube to the goal region": [1, 305, 718, 319, 325, 316, 263, 323, 312, 282, 391, 263, 334, 282, 263]
    + [347, 366, 721, 13, 723, 286, 718],
    "Weird UPPER 123 ünï": [1, 305, 718, 319, 325, 316, 263, 323, 312, 282, 693, 710, 695, 699, 706, 707, 349, 705]
    + [372, 693, 52, 53, 54, 693, 198, 191, 701, 198, 178, 721, 13, 723, 286, 718],
}


def test_tokenizer_ids_equal_the_reference_stacks(tiny_openvla):
    _, processor = load_openvla(tiny_openvla)
    space = processor.tokenizer.convert_tokens_to_ids("▁")
    for text, expected in IDS_UNDER_TRANSFORMERS_4.items():
        ids, _ = processor.prompt_ids([text])
        assert ids[0].tolist() == expected + [space]


def test_forward_follows_reference_conventions(tiny_openvla):
    """Features from the second-to-last block via timm's get_intermediate_layers (the reference's call), projector
    fc1-GELU-fc2-GELU-fc3, and the sequence [<s>, patches, rest of the prompt] with positions 0..S-1."""
    model, processor = load_openvla(tiny_openvla)
    pixels = processor.preprocess_images(torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8))
    ids, mask = processor.prompt_ids(["put the carrot on the plate"])
    vb = model.vision_backbone
    with torch.no_grad():
        dino = vb.featurizer.get_intermediate_layers(pixels[:, :3], n={len(vb.featurizer.blocks) - 2})[0]
        siglip = vb.fused_featurizer.get_intermediate_layers(pixels[:, 3:], n={len(vb.fused_featurizer.blocks) - 2})[0]
        features = torch.cat([dino, siglip], 2)
        assert features.shape == (1, 256, 64)
        p = model.projector
        patches = p.fc3(torch.nn.functional.gelu(p.fc2(torch.nn.functional.gelu(p.fc1(features)))))
        text = model.language_model.get_input_embeddings()(ids)
        expected = model.language_model(inputs_embeds=torch.cat([text[:, :1], patches, text[:, 1:]], 1)).logits
        ours = model(ids, mask, pixels).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_single_rows(tiny_openvla):
    model, processor = load_openvla(tiny_openvla)
    texts = ["push the cube to the goal region", "pick up the cube"]
    pixels = processor.preprocess_images(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    ids, mask = processor.prompt_ids(texts)
    assert mask[1, 0] == 0 and mask[0].all()  # the shorter prompt is left-padded
    with torch.no_grad():
        batched = model(ids, mask, pixels).logits[:, -1]
        for i, text in enumerate(texts):
            single = model(*processor.prompt_ids([text]), pixels[i : i + 1]).logits[:, -1]
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)


def test_prompt_ends_with_the_space_token(tiny_openvla):
    _, processor = load_openvla(tiny_openvla)
    ids, _ = processor.prompt_ids(["Push The Cube"])
    tok = processor.tokenizer
    assert ids[0, 0].item() == tok.bos_token_id and ids[0, -1].item() == tok.convert_tokens_to_ids("▁")
    assert tok.decode(ids[0, 1:-1]).strip() == PROMPT.format("push the cube").strip()


def test_action_tokenizer_round_trip_and_bin_edges():
    at = ActionTokenizer(vocab_size=32000)
    assert at.first_token == 31744 and at.bin_centers.numel() == 255
    torch.testing.assert_close(at.bin_centers[0], torch.tensor(-1 + 1 / 255))
    actions = torch.linspace(-0.999, 0.999, 1001)
    tokens = at.normalized_to_tokens(actions)
    assert tokens.min() >= 31744 and tokens.max() <= 31999
    decoded = at.tokens_to_normalized(tokens)
    assert (decoded - actions).abs().max() <= 1 / 255 + 1e-6  # within half a bin width (bins are 2/255 wide)
    # the token -> bin rule at the edges: 31999 -> bin 0, 31745 -> bin 254, 31744 -> clipped to bin 254
    assert at.tokens_to_normalized(torch.tensor([31999, 31745, 31744])).tolist() == [
        at.bin_centers[0].item(),
        at.bin_centers[254].item(),
        at.bin_centers[254].item(),
    ]


def test_unnormalize_uses_q01_q99_and_mask():
    stats = {"q01": [-2.0, 0.0], "q99": [2.0, 1.0], "mask": [True, False]}
    out = ActionTokenizer.unnormalize(torch.tensor([[0.5, 0.5], [-1.0, -1.0]]), stats)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.5], [-2.0, -1.0]]))


def test_bad_checkpoints_and_keys_fail_clearly(tiny_openvla, tmp_path):
    with pytest.raises(FileNotFoundError, match="--model-path"):
        load_openvla(str(tmp_path / "nope" / "missing"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an OpenVLA checkpoint"):
        read_openvla_config(str(tmp_path / "llama"))
    config = read_openvla_config(tiny_openvla)
    with pytest.raises(ValueError, match="maniskill"):
        action_stats(config, "bridge_orig")
    assert action_stats(config, None)["q01"][0] == -1.0


def test_bf16_load_keeps_rope_frequencies_in_float32(tiny_openvla):
    """transformers keeps RoPE's inv_freq in float32 under a bf16 model; a blanket cast would change the rotation."""
    model, _ = load_openvla(tiny_openvla, dtype=torch.bfloat16)
    assert model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_openvla_7b_text_config_still_builds_llama_2_7b():
    """openvla-7b's config.json keeps text_config as a diff against LlamaConfig's defaults of the transformers that
    saved it (4.40); the installed version's defaults must rebuild the same Llama-2 7B from that diff."""
    from transformers import LlamaConfig

    c = LlamaConfig(**{"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5, "pad_token_id": 32000})
    shape = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert shape == (4096, 11008, 32, 32, 32) and c.head_dim == 128 and c.hidden_act == "silu"
    assert c.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"} and c.max_position_embeddings == 2048
    assert not (c.attention_bias or c.mlp_bias or c.tie_word_embeddings) and (c.bos_token_id, c.eos_token_id) == (1, 2)
