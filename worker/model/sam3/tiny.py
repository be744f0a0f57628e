"""A tiny random SAM 3 video model for tests: the real code paths, about 2 M parameters, seconds a clip.

Its sizes were found by trial (docs/research/sam3.md): the tracker's memory encoder output stays at 64
channels (transformers hard-codes its key/value width), the FPN and tracker width is a multiple of 64 above
64, the low-resolution masks are 4 x (image / patch), and the memory attention's RoPE grid is image / patch.
Random weights detect nothing, so `make_it_see` raises two output biases and lowers the detection
thresholds: every query then detects (probabilities just above 0.5) and every track stays present.
The masks mean nothing; the code paths (detection, association, hot start, tracking, memory) are real.
"""

from __future__ import annotations

import torch
from transformers import (
    Sam3Config,
    Sam3DETRDecoderConfig,
    Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig,
    Sam3MaskDecoderConfig,
    Sam3TrackerVideoConfig,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VisionConfig,
    Sam3ViTConfig,
)

PATCH = 14
WIDTH = 128  # FPN and tracker width: > 64 and a multiple of 64
PRESENT_BIAS = 5.0  # sigmoid(5) ~ 0.99: "the object is there" for the tracker, "the phrase is present" for the detector
RANDOM_THRESHOLD = 0.5  # random query logits give probabilities ~0.50-0.52


def tiny_config(image_size: int = 112, max_num_objects: int = 6) -> Sam3VideoConfig:
    """SAM 3's video config at toy sizes: a 2-layer 32-wide ViT, a 1-layer CLIP text encoder, 8 queries."""
    if image_size % PATCH:
        raise ValueError(f"image_size must be a multiple of {PATCH}, but got {image_size}")
    grid = image_size // PATCH
    feature_sizes = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]
    vit = Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=image_size, patch_size=PATCH, window_size=4, global_attn_indexes=[1],
                        pretrain_image_size=image_size)
    detector = Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=WIDTH, backbone_feature_sizes=feature_sizes),
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "hidden_act": "gelu"},
        geometry_encoder_config=Sam3GeometryEncoderConfig(hidden_size=WIDTH, num_layers=1, num_attention_heads=2,
                                                           intermediate_size=64),
        detr_encoder_config=Sam3DETREncoderConfig(hidden_size=WIDTH, num_layers=1, num_attention_heads=2,
                                                   intermediate_size=64),
        detr_decoder_config=Sam3DETRDecoderConfig(hidden_size=WIDTH, num_layers=1, num_queries=8, num_attention_heads=2,
                                                   intermediate_size=64),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=WIDTH, num_attention_heads=2),
    )
    tracker = Sam3TrackerVideoConfig(
        vision_config={"backbone_config": vit.to_dict(), "fpn_hidden_size": WIDTH,
                       "backbone_feature_sizes": feature_sizes},
        prompt_encoder_config={"hidden_size": WIDTH, "image_size": image_size, "patch_size": PATCH},
        mask_decoder_config={"hidden_size": WIDTH, "mlp_dim": 64, "num_attention_heads": 2,
                             "iou_head_hidden_dim": WIDTH},
        memory_attention_hidden_size=WIDTH, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=WIDTH, memory_encoder_output_channels=64, mask_downsampler_embed_dim=WIDTH,
        memory_fuser_embed_dim=WIDTH, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
    )
    tracker.image_size = image_size  # a property (not an __init__ argument) in transformers' typing
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid,
                           score_threshold_detection=RANDOM_THRESHOLD, new_det_thresh=RANDOM_THRESHOLD,
                           max_num_objects=max_num_objects)


def tiny_model(seed: int = 0, image_size: int = 112, max_num_objects: int = 6) -> Sam3VideoModel:
    """The tiny model with weights drawn from `seed` (the same seed, the same weights, the same masks)."""
    torch.manual_seed(seed)
    model = Sam3VideoModel(tiny_config(image_size, max_num_objects)).eval()
    make_it_see(model)
    return model


def make_it_see(model: Sam3VideoModel) -> None:
    """Random weights that detect and track something: the tracker's object-present head and the detector's
    presence head biased to "present"."""
    with torch.no_grad():
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(PRESENT_BIAS)
        model.detector_model.detr_decoder.presence_head.layer3.bias.fill_(PRESENT_BIAS)
