"""Grounded-SAM through ``transformers``: a text prompt finds boxes, SAM cuts masks.

The paper compares its differential mask with Grounded-SAM (Grounding DINO boxes
for a text prompt, each box prompting SAM). This module is that pipeline, built
only from ``transformers`` classes:

* detector: ``AutoModelForZeroShotObjectDetection`` (Grounding DINO) and its
  ``AutoProcessor`` (image processor + BERT tokenizer);
* segmenter: ``SamModel`` and ``SamProcessor``.

Weights are never downloaded: each model is a local folder (``save_pretrained``
layout) or a repo id already in the offline Hugging Face cache, loaded with
``local_files_only=True`` under ``HF_HUB_OFFLINE``. It is never a default; a
hospital that has the weights passes the two folders to the benchmark, e.g.::

    hf download IDEA-Research/grounding-dino-base --local-dir /models/grounding-dino-base
    hf download facebook/sam-vit-huge --local-dir /models/sam-vit-huge
    python -m scripts.distractor_benchmark --grounding-dino /models/grounding-dino-base --sam /models/sam-vit-huge

:func:`build_tiny_grounded_sam` makes the same pipeline with tiny random weights
from configs (a char-level tokenizer, about 160 k parameters): the real code
path for tests, never for masks.
"""

from __future__ import annotations

import inspect
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Repo ids named in the instructions when weights are missing (never fetched here).
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"
DEFAULT_SAM = "facebook/sam-vit-huge"


@dataclass
class GroundedSamSettings:
    """How boxes are found and turned into one mask.

    Grounding DINO expects lower-case phrases each ending with a full stop."""

    prompt: str = "erythema. red rash. skin redness."
    box_threshold: float = 0.30  # detection score a box needs
    text_threshold: float = 0.25  # token score a phrase needs to label the box
    max_boxes: int = 16  # highest-scoring boxes kept
    max_box_fraction: float = 0.8  # boxes covering more of the photo (the whole face) are not lesions
    mask_threshold: float = 0.0  # SAM logit above which a pixel is in the mask
    device: str = "cpu"


def _how_to_provide(what: str, repo: str) -> str:
    return (
        f"{what} weights are never downloaded here (offline). On a machine with internet run\n"
        f"    hf download {repo} --local-dir /models/{repo.split('/')[-1]}\n"
        f"copy the folder to this machine and pass it, or copy a populated Hugging Face cache (HF_HOME) "
        f"and pass the repo id {repo}."
    )


def resolve_local_model(spec: str | os.PathLike[str], what: str, default_repo: str) -> Path:
    """A local folder for ``spec``: the folder itself, or a repo id's snapshot in the
    offline Hugging Face cache. Never touches the network."""
    from privacy_firewall.backends.loading import ModelNotFoundError, offline_mode

    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{what} folder {local} has no config.json.\n{_how_to_provide(what, default_repo)}")
        return local
    text = str(spec)
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        from huggingface_hub import snapshot_download

        try:
            with offline_mode():
                return Path(snapshot_download(text, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any cache miss means "not available offline"
            raise ModelNotFoundError(
                f"{what} weights {text!r} are not in the offline Hugging Face cache ({type(err).__name__}).\n"
                f"{_how_to_provide(what, text)}"
            ) from err
    raise ModelNotFoundError(f"{what} weights not found at {local}.\n{_how_to_provide(what, default_repo)}")


class GroundedSam:
    """Text-prompted boxes (Grounding DINO), then one SAM mask per box; their union."""

    name = "grounded_sam"

    def __init__(self, detector: Any, detector_processor: Any, sam: Any, sam_processor: Any,
                 settings: GroundedSamSettings | None = None) -> None:
        self.settings = settings or GroundedSamSettings()
        self.device = torch.device(self.settings.device)
        self.detector = detector.to(self.device).eval()
        self.detector_processor = detector_processor
        self.sam = sam.to(self.device).eval()
        self.sam_processor = sam_processor

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, detector_path: str | os.PathLike[str], sam_path: str | os.PathLike[str],
                        settings: GroundedSamSettings | None = None) -> GroundedSam:
        """Both models from local files only (ModelNotFoundError says how to get them)."""
        from privacy_firewall.backends.loading import ModelNotFoundError, offline_mode

        # Missing weights fail here, before transformers is imported.
        detector_dir = resolve_local_model(detector_path, "Grounding DINO", DEFAULT_DETECTOR)
        sam_dir = resolve_local_model(sam_path, "SAM", DEFAULT_SAM)
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

        try:
            with offline_mode():
                detector = AutoModelForZeroShotObjectDetection.from_pretrained(detector_dir, local_files_only=True)
                detector_processor = AutoProcessor.from_pretrained(detector_dir, local_files_only=True)
                sam = SamModel.from_pretrained(sam_dir, local_files_only=True)
                sam_processor = SamProcessor.from_pretrained(sam_dir, local_files_only=True)
        except OSError as err:
            raise ModelNotFoundError(
                f"Grounded-SAM weights could not be loaded from {detector_dir} and {sam_dir}: {err}\n"
                f"{_how_to_provide('Grounding DINO', DEFAULT_DETECTOR)}\n{_how_to_provide('SAM', DEFAULT_SAM)}"
            ) from err
        return cls(detector, detector_processor, sam, sam_processor, settings)

    def save_pretrained(self, detector_dir: str | os.PathLike[str], sam_dir: str | os.PathLike[str]) -> None:
        """Both models and processors in the layout :meth:`from_pretrained` reads."""
        self.detector.save_pretrained(detector_dir)
        self.detector_processor.save_pretrained(detector_dir)
        self.sam.save_pretrained(sam_dir)
        self.sam_processor.save_pretrained(sam_dir)

    # -- inference ----------------------------------------------------------------------
    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (k, 4) as pixel x0, y0, x1, y1 inside the photo, and their scores (k,),
        best first, after the score, size and count limits."""
        s = self.settings
        height, width = rgb.shape[:2]
        inputs = self.detector_processor(images=rgb, text=s.prompt, return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        post_process = self.detector_processor.post_process_grounded_object_detection
        # transformers < 4.51 calls the box score threshold ``box_threshold``.
        box_key = "threshold" if "threshold" in inspect.signature(post_process).parameters else "box_threshold"
        found = post_process(outputs, inputs["input_ids"], text_threshold=s.text_threshold,
                             target_sizes=[(height, width)], **{box_key: s.box_threshold})[0]
        boxes = found["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = found["scores"].float().cpu().numpy().reshape(-1)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (area > 0) & (area <= s.max_box_fraction * height * width)
        boxes, scores = boxes[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")[: s.max_boxes]
        return boxes[order], scores[order]

    @torch.inference_mode()
    def masks_for_boxes(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """One SAM mask per box: bool (k, H, W)."""
        if len(boxes) == 0:
            return np.zeros((0, *rgb.shape[:2]), bool)
        inputs = self.sam_processor(images=rgb, input_boxes=[boxes.tolist()], return_tensors="pt")
        outputs = self.sam(pixel_values=inputs["pixel_values"].to(self.device),
                           input_boxes=inputs["input_boxes"].to(self.device), multimask_output=False)
        masks = self.sam_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu(),
            mask_threshold=self.settings.mask_threshold,
        )[0]  # (k, 1, H, W)
        return masks[:, 0].numpy().astype(bool)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        boxes, _ = self.detect(rgb)
        return self.masks_for_boxes(rgb, boxes).any(axis=0) if len(boxes) else np.zeros(rgb.shape[:2], bool)


# ------------------------------------------------------------------------------ tiny models
def _char_level_bert_tokenizer() -> Any:
    """A WordPiece tokenizer over single lower-case letters and '.': any prompt
    tokenizes, without vocabulary files (the ids mean nothing to a real model)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
    vocab += list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def build_tiny_grounded_sam(seed: int = 0, settings: GroundedSamSettings | None = None) -> GroundedSam:
    """Grounding DINO (Swin + BERT, 2 decoder layers) and SAM with tiny widths and
    random weights: the real classes and processors, in well under a second."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )

    tokenizer = _char_level_bert_tokenizer()
    # 128 px: the coarsest of the 4 feature levels must keep more than one pixel (GroupNorm).
    detector_size, sam_size = 128, 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        detector = GroundingDinoForObjectDetection(GroundingDinoConfig(
            backbone_config=SwinConfig(window_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                       image_size=detector_size, out_indices=[2, 3, 4]),
            text_config={"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 8, "max_position_embeddings": 64, "vocab_size": len(tokenizer)},
            d_model=32,  # GroupNorm(32, d_model) in the input projections
            encoder_layers=1, decoder_layers=2,  # 2: the box heads of layers 1.. are tied to layer 0's
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
            num_queries=8, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=64,
        ))
        sam = SamModel(SamConfig(
            vision_config=SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                                          image_size=sam_size, patch_size=8, window_size=4, global_attn_indexes=[0],
                                          num_pos_feats=4, mlp_dim=16),
            prompt_encoder_config=SamPromptEncoderConfig(hidden_size=8, image_size=sam_size, patch_size=8,
                                                         mask_input_channels=4),
            mask_decoder_config=SamMaskDecoderConfig(hidden_size=8, mlp_dim=16, num_hidden_layers=1,
                                                     num_attention_heads=2, iou_head_hidden_dim=8),
        ))
    detector_processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": detector_size, "longest_edge": detector_size}),
        tokenizer=tokenizer,
    )
    sam_processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": sam_size}, pad_size={"height": sam_size, "width": sam_size},
        mask_size={"longest_edge": sam_size // 4}, mask_pad_size={"height": sam_size // 4, "width": sam_size // 4},
    ))
    return GroundedSam(detector, detector_processor, sam, sam_processor, settings)


__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_SAM",
    "GroundedSam",
    "GroundedSamSettings",
    "build_tiny_grounded_sam",
    "resolve_local_model",
]
