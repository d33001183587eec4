"""A live stream from a long-video model: one frame per :meth:`StreamingSession.step`, steered
by the action and class given at that step, with a state that can be saved and loaded.

    session = StreamingSession.start("runs/long", seed=3)
    frame, meta = session.step(action="right")        # uint8 (H, W, 3), {"frame": 0, ...}
    session.save_state("branch.safetensors")          # ... later, or in another process:
    other = StreamingSession.start("runs/long")
    other.load_state("branch.safetensors")            # continues exactly where it was saved

Each frame is one chunk of :func:`~matten.pipelines.long_sampling.sample_chunk`, the same sampling
:func:`~matten.pipelines.long_sampling.iter_long` runs. A saved state is one safetensors file: every
tensor of the :class:`~matten.models.causal.CausalState` (found by walking its dataclasses and
named tuples, so a memory kind added later is saved too), the session's RNG state and the frame
index, with JSON metadata naming the checkpoint (a hash of its weights, its step, its model
config) so that a state is never continued by another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import time
import weakref
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data import atomic_write_path, video_to_uint8
from ..latent import PixelAutoencoder
from .long import LongVideoPipeline, commit_frames, sample_chunk
from .settings import SamplingError, check_sampling

__all__ = [
    "StreamingSession",
    "StateMismatchError",
    "STATE_FORMAT",
    "flatten_state",
    "unflatten_state",
    "checkpoint_identity",
]

STATE_FORMAT = "matten-stream-state/1"


class StateMismatchError(ValueError):
    """A saved stream state that this session cannot continue (another checkpoint, another
    model config, or not a stream state at all)."""


def flatten_state(obj, key: str, tensors: dict) -> object:
    """``obj`` (tensors, dataclasses, named tuples, lists, tuples, dicts, plain values) -> a
    JSON tree naming its classes; each tensor goes into ``tensors`` under a dotted key."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()  # unshared, as safetensors wants
        return {"tensor": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if dataclasses.is_dataclass(obj) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
        names = (
            [f.name for f in dataclasses.fields(obj)]
            if dataclasses.is_dataclass(obj)
            else list(obj._fields)
        )
        cls = type(obj)
        return {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {n: flatten_state(getattr(obj, n), f"{key}.{n}", tensors) for n in names},
        }
    if isinstance(obj, (list, tuple)):
        return {
            "list" if isinstance(obj, list) else "tuple": [
                flatten_state(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)
            ]
        }
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": {k: flatten_state(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
    raise TypeError(f"cannot save {key}: a {type(obj).__name__} in a stream state")


def _state_class(name: str):
    """The class a tree names; only matten's own dataclasses and named tuples, so a crafted
    file cannot make this import or call anything else."""
    module, _, qualname = name.partition(":")
    if module.split(".")[0] != "matten" or not qualname:
        raise StateMismatchError(f"a stream state cannot hold a {name!r}")
    cls: Any = importlib.import_module(module)  # then an attribute of it, of any type
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))):
        raise StateMismatchError(f"a stream state cannot hold a {name!r}")
    return cls


def unflatten_state(tree, tensors: dict, device=None):
    """The inverse of :func:`flatten_state`, tensors moved to ``device``."""
    if "tensor" in tree:
        return tensors[tree["tensor"]].to(device)
    if "value" in tree:
        return tree["value"]
    if "class" in tree:
        fields = {n: unflatten_state(v, tensors, device) for n, v in tree["fields"].items()}
        return _state_class(tree["class"])(**fields)
    if "list" in tree or "tuple" in tree:
        items = [unflatten_state(v, tensors, device) for v in tree.get("list", tree.get("tuple"))]
        return items if "list" in tree else tuple(items)
    return {k: unflatten_state(v, tensors, device) for k, v in tree["dict"].items()}


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_identity(pipe: LongVideoPipeline) -> dict:
    """What a saved state must match: a sha256 of the weights the model runs (names, dtypes,
    shapes, values), the checkpoint's step and its model config. Hashed once per model."""
    model = pipe.model
    if model not in _IDENTITIES:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        _IDENTITIES[model] = digest.hexdigest()
    return {
        "weights_sha256": _IDENTITIES[model],
        "step": pipe.loaded.step,
        "model_config": pipe.loaded.meta["model_config"],
    }


class StreamingSession:
    """One live stream; build it with :meth:`start`. Not thread-safe: one caller at a time."""

    def __init__(
        self, pipe: LongVideoPipeline, *, seed: int, steps, class_label, action_cfg_scale=None
    ):
        self.pipe, self.model, self.seed = pipe, pipe.model, int(seed)
        self.action_names = tuple(pipe.loaded.action_names)
        self.class_names = tuple(pipe.loaded.class_names)
        self.num_classes = pipe.loaded.num_classes
        self.sampler = pipe.default("sampler", None, "ddim")
        self.eta = float(pipe.default("eta", None, 0.0))
        self.cfg_scale = float(pipe.default("cfg_scale", None, 1.0)) if self.num_classes else 1.0
        self.guided = self.cfg_scale != 1.0
        self.action_cfg_scale = pipe.action_guidance_scale(action_cfg_scale)
        self.steps = self.check_steps(pipe.default("steps", steps, None))
        self.class_label = None
        self.class_label = self.class_index(class_label) if self.num_classes else None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.state = self.model.init_state(2 if self.guided else 1)
        self._diffusions: dict[int, object] = {}

    @classmethod
    def start(
        cls,
        pipe_or_path,
        *,
        seed: int = 0,
        steps: int | None = None,
        class_label=None,
        context: torch.Tensor | None = None,
        context_actions=None,
        action_cfg_scale: float | None = None,
    ) -> StreamingSession:
        """A new stream from a :class:`LongVideoPipeline` or a checkpoint path. ``context``:
        frames (3, n, H, W) or (1, 3, n, H, W) in [-1, 1] the stream continues (generated frames
        are numbered from n); ``context_actions``: their n actions (indices or names; default:
        the first action for each; a model conditions on them as on its own, so a context
        that moved should say how). ``class_label``: index or name (default: class 0).
        ``action_cfg_scale``: guidance on the held action (default: the run's
        ``sample.action_cfg_scale``, else 1 = none); above 1 a frame costs two model runs per
        denoising step and the held action weighs more."""
        pipe = (
            pipe_or_path
            if isinstance(pipe_or_path, LongVideoPipeline)
            else LongVideoPipeline.from_pretrained(pipe_or_path)
        )
        session = cls(
            pipe,
            seed=seed,
            steps=steps,
            class_label=class_label,
            action_cfg_scale=action_cfg_scale,
        )
        if context is not None:
            session._commit_context(context, context_actions)
        elif context_actions is not None:
            raise SamplingError("context_actions given without context frames")
        return session

    @property
    def frame(self) -> int:
        """The index of the next frame (the number of frames in the stream so far)."""
        return self.state.frames

    @property
    def num_actions(self) -> int:
        return self.model.num_actions

    def check_steps(self, steps) -> int:
        return check_sampling(
            self.sampler, steps, self.eta, 1.0, self.pipe.loaded.diffusion_steps, conditional=False
        )

    def class_index(self, class_label) -> int:
        """A class (index or name) -> its index; None keeps the session's."""
        if class_label is None:
            return 0 if self.class_label is None else self.class_label
        return int(self.pipe.labels(class_label, 1, option="class")[0])

    def action_index(self, action) -> int:
        """An action (index or name) -> its index; None is the first action (e.g. "stay")."""
        if action is None:
            return 0
        names = {n.lower(): i for i, n in enumerate(self.action_names)}
        if isinstance(action, str) and action.strip().lower() in names:
            return names[action.strip().lower()]
        if (
            isinstance(action, int)
            and not isinstance(action, bool)
            and 0 <= action < self.num_actions
        ):
            return action
        known = f" or one of {list(self.action_names)}" if self.action_names else ""
        raise SamplingError(
            f"unknown action {action!r}: an index in [0, {self.num_actions - 1}]{known}"
        )

    def _conditions(self, action, class_label, frames: int):
        """(labels (1,) or None, actions (1, frames) or None, action index, class index)."""
        if self.model.action_dim:
            raise SamplingError("live play steers discrete actions; this model takes vectors")
        if not self.num_classes and class_label is not None:
            raise SamplingError("this model is unconditional: it takes no class")
        if not self.model.takes_actions and action is not None:
            raise SamplingError("this model takes no actions")
        label = self.class_index(class_label) if self.num_classes else None
        index = self.action_index(action) if self.model.takes_actions else None
        device = self.pipe.device
        labels = None if label is None else torch.tensor([label], device=device)
        acts = None if index is None else torch.full((1, frames), index, device=device)
        return labels, acts, index, label

    def _commit_context(self, context: torch.Tensor, context_actions=None) -> None:
        context = context[None] if context.dim() == 4 else context
        with torch.no_grad():
            latents = self.pipe.autoencoder.encode(context.to(self.pipe.device))
        labels, acts, _, _ = self._conditions(None, None, latents.shape[2])
        if context_actions is not None:
            given = list(context_actions)
            if not self.model.takes_actions:
                raise SamplingError("this model takes no actions")
            if len(given) != latents.shape[2]:
                raise SamplingError(
                    f"context_actions: {len(given)} actions for {latents.shape[2]} frames"
                )
            indices = [self.action_index(a.item() if torch.is_tensor(a) else a) for a in given]
            acts = torch.tensor([indices], device=acts.device, dtype=acts.dtype)
        self.state = commit_frames(
            self.model,
            latents.to(next(self.model.parameters()).dtype),
            self.state,
            labels,
            acts,
            self.guided,
        )

    def step(
        self, action=None, class_label=None, steps: int | None = None, output_type: str = "np"
    ):
        """Generate the next frame with ``action`` (index or name; None: the first action) and
        ``class_label`` (None: the session's, else it becomes the session's) ->
        (frame, metadata). ``frame``: uint8 (H, W, 3) (``output_type="np"``) or the decoded
        (3, H, W) tensor in [-1, 1] (``"pt"``). ``steps`` changes the session's DDIM steps."""
        if output_type not in ("np", "pt"):
            raise SamplingError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        began = time.perf_counter()
        labels, acts, index, label = self._conditions(action, class_label, 1)
        if steps is not None:
            self.steps = self.check_steps(steps)
        if label is not None:
            self.class_label = label
        number = self.frame
        latent, self.state = sample_chunk(
            self.model,
            self.diffusion(),
            self.state,
            1,
            self.pipe.latent_shape(),
            labels=labels,
            actions=acts,
            sampler=self.sampler,
            eta=self.eta,
            cfg_scale=self.cfg_scale,
            action_cfg_scale=self.action_cfg_scale,
            clip_denoised=isinstance(self.pipe.autoencoder, PixelAutoencoder),
            generator=self.generator,
            device=self.pipe.device,
        )
        with torch.no_grad():
            pixels = self.pipe.autoencoder.decode(latent).clamp(-1, 1)[0, :, 0]
        frame = video_to_uint8(pixels[:, None])[0] if output_type == "np" else pixels
        meta = {
            "frame": number,
            "action": index,
            "class": label,
            "steps": self.steps,
            "action_name": self._name(self.action_names, index),
            "class_name": self._name(self.class_names, label),
            "ms": (time.perf_counter() - began) * 1000.0,
        }
        return frame, meta

    def diffusion(self):
        """The checkpoint's diffusion respaced to the session's steps (built once per count)."""
        if self.steps not in self._diffusions:
            self._diffusions[self.steps] = self.pipe.respaced_diffusion(self.steps)
        return self._diffusions[self.steps]

    @staticmethod
    def _name(names, index):
        return names[index] if index is not None and index < len(names) else None

    def _settings(self) -> dict:
        return {
            "seed": self.seed,
            "steps": self.steps,
            "class_label": self.class_label,
            "sampler": self.sampler,
            "eta": self.eta,
            "cfg_scale": self.cfg_scale,
            "action_cfg_scale": self.action_cfg_scale,
            "frame": self.frame,
        }

    def save_state(self, path) -> None:
        """Write everything the stream carries to one safetensors file, atomically."""
        tensors: dict = {}
        tree = flatten_state(self.state, "state", tensors)
        tensors["rng"] = self.generator.get_state()
        tensors["frame"] = torch.tensor([self.frame], dtype=torch.long)
        metadata = {
            "format": STATE_FORMAT,
            "state": json.dumps(tree),
            "checkpoint": json.dumps(checkpoint_identity(self.pipe), sort_keys=True),
            "session": json.dumps(self._settings()),
        }
        with atomic_write_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_state(self, path) -> None:
        """Continue the stream saved in ``path``; refuses (:class:`StateMismatchError`) a state
        of another checkpoint or model config, leaving this session as it was."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise StateMismatchError(f"'{path}' is not a readable stream state: {exc}") from None
        if metadata.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"'{path}' is not a stream state ({STATE_FORMAT})")
        saved, ours = json.loads(metadata["checkpoint"]), checkpoint_identity(self.pipe)
        if saved["model_config"] != ours["model_config"]:
            differ = sorted(
                k
                for k in set(saved["model_config"]) | set(ours["model_config"])
                if saved["model_config"].get(k) != ours["model_config"].get(k)
            )
            raise StateMismatchError(
                f"'{path}' was made by a model of another config (differs "
                f"in {', '.join(differ)}): it cannot continue here"
            )
        if saved["weights_sha256"] != ours["weights_sha256"]:
            raise StateMismatchError(
                f"'{path}' was made by another checkpoint (step {saved['step']}, weights "
                f"{saved['weights_sha256'][:12]}); this session runs step {ours['step']}, weights "
                f"{ours['weights_sha256'][:12]}"
            )
        settings = json.loads(metadata["session"])
        state = unflatten_state(json.loads(metadata["state"]), tensors, self.pipe.device)
        if settings["cfg_scale"] != self.cfg_scale:
            raise StateMismatchError(
                f"'{path}' was made with guidance scale "
                f"{settings['cfg_scale']}, this session uses {self.cfg_scale}"
            )
        self.state = state
        # the state's sampling settings, as its steps (older states: no guidance on actions)
        self.action_cfg_scale = self.pipe.action_guidance_scale(
            settings.get("action_cfg_scale", 1.0)
        )
        self.generator.set_state(tensors["rng"])
        self.seed, self.steps = settings["seed"], settings["steps"]
        self.class_label, self.sampler, self.eta = (
            settings["class_label"],
            settings["sampler"],
            settings["eta"],
        )
