"""Datasets and video I/O: the benchmark layouts, any folder of videos, a synthetic set."""

from .datasets import (DATASETS, FaceForensicsDataset, FolderDataset, SkyTimelapseDataset,
                       TaichiHDDataset, UCF101Dataset, VideoClipDataset, VideoEntry, build_dataset,
                       find_videos)
from .long_memory import (ACTION_NAMES, DARK, PanningMapDataset, actions_from_camera,
                          pixel_last_seen, retrieval_error, revisit_pairs)
from .synthetic import MOTION_TYPES, SyntheticVideoDataset
from .transforms import (VideoTransform, clip_span, hflip, random_hflip, resize_center_crop,
                         sample_clip_indices, video_to_uint8)
from .video_io import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ShortVideoError, VideoDecodeError,
                       count_frames, make_grid, read_frame_folder, read_video, save_grid_image,
                       write_video)

__all__ = ["ACTION_NAMES", "DARK", "PanningMapDataset", "actions_from_camera", "pixel_last_seen",
           "retrieval_error", "revisit_pairs", "DATASETS", "IMAGE_EXTENSIONS", "MOTION_TYPES",
           "VIDEO_EXTENSIONS",
           "FaceForensicsDataset", "FolderDataset", "ShortVideoError", "SkyTimelapseDataset",
           "SyntheticVideoDataset", "TaichiHDDataset", "UCF101Dataset", "VideoClipDataset",
           "VideoDecodeError", "VideoEntry", "VideoTransform", "build_dataset", "clip_span",
           "count_frames", "find_videos", "hflip", "make_grid", "random_hflip", "read_frame_folder",
           "read_video", "resize_center_crop", "sample_clip_indices", "save_grid_image",
           "video_to_uint8", "write_video"]
