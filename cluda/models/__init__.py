"""Segmentation networks: MiT / timm encoders, the DAFormer decoder, the segmentor, HRDA."""
from .backbones import FrozenEncoder, TimmBackbone, available_backbones, build_backbone, build_imnet_encoder
from .decoder import DAFormerHead
from .hrda import HRDA, HRDAOutput, box_to_grid, crop, random_crop_box
from .mit import MIT_CONFIGS, MixVisionTransformer, load_mit_weights, mit
from .segmentor import Segmentor, build_segmentor, param_groups, sliding_window
from .weights import check_state_dict, load_state_checked, read_state_dict

__all__ = [
    "DAFormerHead",
    "FrozenEncoder",
    "HRDA",
    "HRDAOutput",
    "MIT_CONFIGS",
    "MixVisionTransformer",
    "Segmentor",
    "TimmBackbone",
    "available_backbones",
    "box_to_grid",
    "build_backbone",
    "build_imnet_encoder",
    "build_segmentor",
    "check_state_dict",
    "crop",
    "load_mit_weights",
    "load_state_checked",
    "mit",
    "param_groups",
    "random_crop_box",
    "read_state_dict",
    "sliding_window",
]
