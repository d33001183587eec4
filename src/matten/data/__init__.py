"""Datasets and video I/O: the benchmark layouts, any folder of videos, the built-in sets
(synthetic shapes, moving digits, the panning map), reading and writing videos and grids."""

from .atomic import atomic_write_path, remove_stale_temp_files
from .benchmarks import (
    FaceForensicsDataset,
    FolderDataset,
    SkyTimelapseDataset,
    TaichiHDDataset,
    UCF101Dataset,
)
from .datasets import VideoClipDataset, VideoEntry, find_videos
from .grids import (
    grid_path_for,
    make_grid,
    save_grid_image,
    save_samples,
    tile_videos,
    upscale_frames,
)
from .long_memory import ACTION_NAMES, DARK, PanningMapDataset, actions_from_camera
from .moving_digits import DIGIT_CLASSES, MovingDigitsDataset
from .registry import (
    DATASETS,
    action_names,
    build_dataset,
    clip_actions,
    dataset_from_config,
    dataset_key,
)
from .synthetic import MOTION_TYPES, SyntheticVideoDataset
from .transforms import (
    VideoTransform,
    clip_span,
    hflip,
    random_hflip,
    resize_center_crop,
    sample_clip_indices,
    video_to_uint8,
)
from .video_read import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ShortVideoError,
    VideoDecodeError,
    count_frames,
    read_frame_folder,
    read_video,
)
from .video_write import VIDEO_SUFFIXES, StreamingVideoWriter, partial_video_path, write_video

__all__ = [
    "ACTION_NAMES",
    "DARK",
    "PanningMapDataset",
    "actions_from_camera",
    "DATASETS",
    "DIGIT_CLASSES",
    "IMAGE_EXTENSIONS",
    "MOTION_TYPES",
    "VIDEO_EXTENSIONS",
    "FaceForensicsDataset",
    "FolderDataset",
    "MovingDigitsDataset",
    "ShortVideoError",
    "SkyTimelapseDataset",
    "SyntheticVideoDataset",
    "TaichiHDDataset",
    "UCF101Dataset",
    "VideoClipDataset",
    "VideoDecodeError",
    "VideoEntry",
    "VideoTransform",
    "build_dataset",
    "clip_span",
    "count_frames",
    "find_videos",
    "hflip",
    "make_grid",
    "random_hflip",
    "read_frame_folder",
    "read_video",
    "resize_center_crop",
    "sample_clip_indices",
    "save_grid_image",
    "video_to_uint8",
    "write_video",
    "grid_path_for",
    "save_samples",
    "tile_videos",
    "upscale_frames",
    "action_names",
    "clip_actions",
    "dataset_from_config",
    "dataset_key",
    "StreamingVideoWriter",
    "atomic_write_path",
    "partial_video_path",
    "remove_stale_temp_files",
    "VIDEO_SUFFIXES",
]
