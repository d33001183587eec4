"""The four benchmark layouts of the paper's experiments, and any folder: UCF101 (labelled by
class folder, with the official splits), SkyTimelapse, FaceForensics, Taichi-HD."""

from __future__ import annotations

import re
from pathlib import Path

from .datasets import VideoClipDataset, check_root, find_videos, split_root
from .video_read import VIDEO_EXTENSIONS

__all__ = [
    "UCF101Dataset",
    "SkyTimelapseDataset",
    "FaceForensicsDataset",
    "TaichiHDDataset",
    "FolderDataset",
]

_UCF_GROUP = re.compile(r"_g(\d+)_c(\d+)", re.IGNORECASE)


class UCF101Dataset(VideoClipDataset):
    """UCF101: ``root/<ClassName>/v_<ClassName>_gXX_cYY.avi``, labelled by class folder.

    Classes are the folder names sorted alphabetically (case-insensitively, which is the order of
    the official ``classInd.txt``). ``split="train"``/``"test"`` uses the official list
    ``trainlist0{fold}.txt`` / ``testlist0{fold}.txt`` when found in ``split_dir``, ``root``,
    ``root/ucfTrainTestlist`` or ``root/../ucfTrainTestlist``; without it the same split is
    rebuilt from the group numbers (fold k tests groups 7k-6 .. 7k). ``split=None`` uses every
    video (the usual protocol for generation).
    """

    def __init__(
        self,
        root,
        resolution,
        num_frames: int = 16,
        frame_stride: int = 3,
        split: str | None = None,
        fold: int = 1,
        split_dir=None,
        **kwargs,
    ):
        root = check_root(root)
        if split not in (None, "train", "test"):
            raise ValueError(f"UCF101 split must be None, 'train' or 'test', got {split!r}")
        if fold not in (1, 2, 3):
            raise ValueError(f"UCF101 fold must be 1, 2 or 3, got {fold!r}")
        exts = kwargs.pop("extensions", VIDEO_EXTENSIONS)
        paths = find_videos(root, exts)
        if not paths:
            raise ValueError(
                f"UCF101: no videos found under '{root}' "
                "(expected root/<ClassName>/v_<ClassName>_gXX_cYY.avi)"
            )
        classes = sorted(
            {p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1},
            key=lambda s: (s.lower(), s),
        )
        skipped: dict[str, list[str]] = {}
        if split is not None:
            paths = self._apply_split(root, paths, split, fold, split_dir, skipped)
        self.split, self.fold = split, fold
        index = {c: i for i, c in enumerate(classes)}
        videos = []
        for p in paths:
            parts = p.relative_to(root).parts
            if len(parts) > 1:
                videos.append((p, index[parts[0]]))
            else:
                skipped.setdefault("no_class_folder", []).append(str(p))
        kwargs.setdefault("name", "UCF101")
        kwargs.pop("labels_from_folders", None)
        super().__init__(
            root,
            resolution,
            num_frames,
            frame_stride,
            videos=videos,
            class_names=classes,
            skipped=skipped,
            **kwargs,
        )

    @staticmethod
    def find_split_file(root: Path, split: str, fold: int, split_dir=None) -> Path | None:
        name = f"{split}list0{fold}.txt"
        dirs = [Path(split_dir)] if split_dir is not None else []
        dirs += [root, root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist"]
        for d in dirs:
            if (d / name).is_file():
                return d / name
        if split_dir is not None:
            raise FileNotFoundError(f"UCF101 split file '{Path(split_dir) / name}' not found")
        return None

    def _apply_split(self, root, paths, split, fold, split_dir, skipped):
        listed = self.find_split_file(root, split, fold, split_dir)
        if listed is not None:
            wanted = set()
            for line in listed.read_text().splitlines():
                if line.strip():
                    wanted.add(line.split()[0].replace("\\", "/").lower())
            by_rel = {p.relative_to(root).as_posix().lower(): p for p in paths}
            missing = sorted(wanted - set(by_rel))
            if missing:
                skipped["missing"] = [str(root / m) for m in missing]
            return [p for r, p in by_rel.items() if r in wanted]
        test_groups = range(7 * fold - 6, 7 * fold + 1)
        kept = []
        for p in paths:
            m = _UCF_GROUP.search(p.stem)
            if m is None:
                skipped.setdefault("no_group", []).append(str(p))
            elif (int(m.group(1)) in test_groups) == (split == "test"):
                kept.append(p)
        return kept


class SkyTimelapseDataset(VideoClipDataset):
    """Sky Time-lapse: ``root/<video_id>/<clip_id>/*.jpg`` nested frame folders (unlabelled).

    ``split`` picks ``root/<split>`` or ``root/sky_<split>`` (the official ``sky_train`` /
    ``sky_test``) when present.
    """

    def __init__(
        self,
        root,
        resolution,
        num_frames: int = 16,
        frame_stride: int = 3,
        split: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", "SkyTimelapse")
        super().__init__(
            split_root(root, split, ("sky_{split}",)),
            resolution,
            num_frames,
            frame_stride,
            **kwargs,
        )
        self.split = split


class FaceForensicsDataset(VideoClipDataset):
    """FaceForensics: a folder of videos or of frame folders (unlabelled); ``split`` picks
    ``root/<split>`` when present."""

    def __init__(
        self,
        root,
        resolution,
        num_frames: int = 16,
        frame_stride: int = 3,
        split: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", "FaceForensics")
        super().__init__(split_root(root, split), resolution, num_frames, frame_stride, **kwargs)
        self.split = split


class TaichiHDDataset(VideoClipDataset):
    """Taichi-HD: ``root/{train,test}/`` with videos or frame folders (often folders named like
    ``<id>.mp4`` holding PNG frames); ``split`` picks the subfolder when present."""

    def __init__(
        self,
        root,
        resolution,
        num_frames: int = 16,
        frame_stride: int = 3,
        split: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", "TaichiHD")
        super().__init__(split_root(root, split), resolution, num_frames, frame_stride, **kwargs)
        self.split = split


class FolderDataset(VideoClipDataset):
    """Any folder of videos / frame folders; ``split`` picks ``root/<split>`` when present;
    ``labels_from_folders=True`` labels by top-level folder."""

    def __init__(
        self,
        root,
        resolution,
        num_frames: int = 16,
        frame_stride: int = 3,
        split: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", "VideoFolder")
        super().__init__(split_root(root, split), resolution, num_frames, frame_stride, **kwargs)
        self.split = split
