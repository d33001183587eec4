"""The web app of ``matten play``: one page and a websocket per browser tab, each tab its own
:class:`~matten.pipelines.StreamingSession`.

The protocol is JSON text. The server sends ``hello`` (the model's actions, classes, steps, the
guidance scale on actions and the saved snapshots) once, then a ``frame`` per generated frame
(its metadata and a base64 PNG), and a reply to some commands. The client sends
``{"type": ...}`` with type one of

    action {"action": name | index | null}     the action applied from the next frame on
    class {"class": name | index}              the class, for a class-conditional model
    pause, resume, steps {"steps": n}          stop / go on; the DDIM steps (speed)
    snapshot {"name": optional}, restore {"name"}, list    stream states under the output folder
    save_video                                 an MP4 of the frames so far, offered at /videos/...

Bad input (malformed JSON, an unknown action or class, an oversized message, a name that is not
a plain name) is answered with ``{"type": "error", "message": ...}`` and the stream goes on.
Clients name snapshots only by a plain name; the server decides where the files go.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from collections import deque
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..data import upscale_frames, write_video
from ..pipelines import LongVideoPipeline, SamplingError, StateMismatchError, StreamingSession

__all__ = ["PlayError", "load_playable", "create_app", "MAX_MESSAGE_BYTES", "MAX_RECORDED"]

MAX_MESSAGE_BYTES = 4096  # a command is a few dozen bytes; anything this long is refused
MAX_RECORDED = 9000  # frames kept for "save video" (10 minutes at 15 fps) ...
MAX_RECORDED_BYTES = 256 << 20  # ... or fewer, for large frames: memory per tab stays bounded
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
VIDEO_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.mp4")
CLOSED = object()  # what the reader queues when the socket has gone


class PlayError(ValueError):
    """A command the stream cannot carry out; its message goes back to the client."""


def load_playable(path, device=None) -> LongVideoPipeline:
    """The long-video pipeline of a checkpoint, or a :class:`PlayError` saying which can play."""
    try:
        return LongVideoPipeline.from_pretrained(path, device=device)
    except SamplingError as exc:
        raise PlayError(
            f"only long-video models can play (model.name: Matten-Causal, e.g. "
            f"trained with --config long): {exc}"
        ) from None


def _png(frame) -> str:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Stream:
    """One tab's stream: commands arrive in a queue (a reader task fills it) and are handled
    between frames, so a frame is never generated while the state is saved or replaced."""

    def __init__(self, server: PlayServer, ws: WebSocket, number: int):
        self.server, self.ws, self.number = server, ws, number
        self.session = StreamingSession.start(
            server.pipe,
            seed=server.seed + number,
            steps=server.steps,
            action_cfg_scale=server.action_cfg_scale,
        )
        self.action = self.class_label = None
        self.paused = False
        self.recorded: deque | None = None  # the last frames; sized by the first frame
        self.inbox: asyncio.Queue = asyncio.Queue()

    async def read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                await self.inbox.put(text if text is not None else message.get("bytes"))
        finally:
            await self.inbox.put(CLOSED)

    async def run(self) -> None:
        reader = asyncio.create_task(self.read())
        try:
            await self.ws.send_json(self.hello())
            while True:
                message = await self.inbox.get() if self.paused else self._next_or_none()
                while message is not None:
                    if message is CLOSED:
                        return
                    await self.handle(message)
                    message = self._next_or_none()
                if not self.paused:
                    await self.send_frame()
        finally:
            reader.cancel()

    def _next_or_none(self):
        return None if self.inbox.empty() else self.inbox.get_nowait()

    def hello(self) -> dict:
        s = self.session
        actions = list(s.action_names) or [str(i) for i in range(s.num_actions)]
        classes = list(s.class_names) or [str(i) for i in range(s.num_classes)]
        return {
            "type": "hello",
            "actions": actions if self.session.model.takes_actions else [],
            "classes": classes,
            "steps": s.steps,
            "max_steps": self.server.pipe.loaded.diffusion_steps,
            "action_cfg_scale": s.action_cfg_scale,
            "snapshots": self.server.snapshot_names(),
            "stream": self.number,
        }

    async def send_frame(self) -> None:
        frame, meta = await run_in_threadpool(
            self.session.step, action=self.action, class_label=self.class_label
        )
        if self.recorded is None:
            self.recorded = deque(
                maxlen=max(1, min(MAX_RECORDED, MAX_RECORDED_BYTES // frame.nbytes))
            )
        self.recorded.append(frame)
        await self.ws.send_json(
            {
                "type": "frame",
                **meta,
                "height": frame.shape[0],
                "width": frame.shape[1],
                "png": _png(frame),
            }
        )

    async def handle(self, raw) -> None:
        try:
            reply = await self.command(self.parse(raw))
        except (PlayError, SamplingError, StateMismatchError) as exc:
            reply = {"type": "error", "message": str(exc)}
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug must not end the stream: say so, carry on
            reply = {"type": "error", "message": f"internal error: {type(exc).__name__}: {exc}"}
        if reply is not None:
            await self.ws.send_json(reply)

    @staticmethod
    def parse(raw) -> dict:
        if not isinstance(raw, str):
            raise PlayError("binary messages are not understood: send JSON text")
        if len(raw.encode()) > MAX_MESSAGE_BYTES:
            raise PlayError(
                f"message too long ({len(raw.encode())} bytes; the limit is {MAX_MESSAGE_BYTES})"
            )
        try:
            message = json.loads(raw)
        except ValueError as exc:
            raise PlayError(f"malformed JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise PlayError('a message is a JSON object with a "type"')
        return message

    async def command(self, message: dict) -> dict | None:
        kind, s = message["type"], self.session
        if kind == "action":
            action = message.get("action")
            if not s.model.takes_actions:
                raise PlayError("this model takes no actions")
            s.action_index(action)  # refuses an unknown one now, not at the next frame
            self.action = action
        elif kind == "class":
            if not s.num_classes:
                raise PlayError("this model is unconditional: it has no classes")
            self.class_label = s.class_index(message.get("class"))
        elif kind in ("pause", "resume"):
            self.paused = kind == "pause"
            return {"type": "paused" if self.paused else "resumed", "frame": s.frame}
        elif kind == "steps":
            steps = message.get("steps")
            if not isinstance(steps, int) or isinstance(steps, bool):
                raise PlayError(f"steps must be an integer, got {steps!r}")
            s.steps = s.check_steps(steps)
            return {"type": "steps", "steps": s.steps}
        elif kind == "snapshot":
            name = self.server.check_name(
                message.get("name") or f"stream{self.number}-frame{s.frame}"
            )
            await run_in_threadpool(s.save_state, self.server.snapshot_path(name))
            return {"type": "snapshot", "name": name, "frame": s.frame}
        elif kind == "restore":
            path = self.server.snapshot_path(self.server.check_name(message.get("name")))
            if not path.is_file():
                raise PlayError(f"no snapshot named {message.get('name')!r}")
            await run_in_threadpool(s.load_state, path)
            self.class_label = s.class_label
            return {
                "type": "restored",
                "name": message["name"],
                "frame": s.frame,
                "action_cfg_scale": s.action_cfg_scale,  # the state's, as its steps
            }
        elif kind == "list":
            return {"type": "snapshots", "names": self.server.snapshot_names()}
        elif kind == "save_video":
            return await self.save_video()
        else:
            raise PlayError(f"unknown message type {kind!r}")
        return None

    async def save_video(self) -> dict:
        if not self.recorded:
            raise PlayError("no frames yet")
        name = f"stream{self.number}-frame{self.session.frame}.mp4"
        frames = upscale_frames(np.stack(self.recorded), 256)  # (T, H, W, 3), enlarged to be seen
        fps = float(self.server.pipe.default("fps", None, 8))
        await run_in_threadpool(write_video, self.server.videos / name, frames, fps)
        return {
            "type": "video",
            "name": name,
            "url": f"/videos/{name}",
            "frames": len(self.recorded),
        }


class PlayServer:
    """What all streams share: the pipeline, the output folder, the bound on live streams."""

    def __init__(
        self,
        pipe: LongVideoPipeline,
        output,
        max_streams: int = 2,
        seed: int = 0,
        steps: int | None = None,
        action_cfg_scale: float | None = None,
    ):
        if max_streams < 1:
            raise PlayError(f"max_streams must be >= 1, got {max_streams}")
        self.pipe, self.max_streams, self.seed = pipe, int(max_streams), int(seed)
        self.steps = steps  # the streams' DDIM steps to start with (None: the run's)
        self.action_cfg_scale = action_cfg_scale  # guidance on actions (None: the run's)
        # refuses bad settings now, not in every tab
        StreamingSession.start(pipe, steps=steps, action_cfg_scale=action_cfg_scale)
        self.output = Path(output)
        self.snapshots, self.videos = self.output / "snapshots", self.output / "videos"
        self.live = self.opened = 0

    @staticmethod
    def check_name(name) -> str:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise PlayError(
                f"a snapshot name is 1 to 64 letters, digits, '-' or '_' (the "
                f"server chooses where it is kept), got {name!r}"
            )
        return name

    def snapshot_path(self, name: str) -> Path:
        return self.snapshots / f"{name}.safetensors"

    def snapshot_names(self) -> list[str]:
        return sorted(p.stem for p in self.snapshots.glob("*.safetensors"))

    async def page(self, request):
        return HTMLResponse(resources.files("matten.play").joinpath("page.html").read_text())

    async def video(self, request):
        name = request.path_params["name"]
        path = self.videos / name
        if not VIDEO_NAME.fullmatch(name) or not path.is_file():
            return PlainTextResponse("no such video", status_code=404)
        return FileResponse(path, media_type="video/mp4", filename=name)

    async def websocket(self, ws: WebSocket) -> None:
        await ws.accept()
        if self.live >= self.max_streams:  # no await since the check: no other tab can race
            await ws.send_json(
                {
                    "type": "busy",
                    "message": f"busy: all {self.max_streams} live "
                    "streams are in use; close another tab or try again later",
                }
            )
            await ws.close()
            return
        self.live += 1
        self.opened += 1
        try:
            await Stream(self, ws, self.opened).run()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the tab went away mid-frame (a send on a closed socket)
        finally:
            self.live -= 1  # closing a tab frees its stream (its state goes with it)


def create_app(
    pipe: LongVideoPipeline,
    output,
    *,
    max_streams: int = 2,
    seed: int = 0,
    steps: int | None = None,
    action_cfg_scale: float | None = None,
):
    """The starlette app: ``/`` the page, ``/ws`` a stream, ``/videos/NAME`` a saved video."""
    server = PlayServer(
        pipe,
        output,
        max_streams=max_streams,
        seed=seed,
        steps=steps,
        action_cfg_scale=action_cfg_scale,
    )
    app = Starlette(
        routes=[
            Route("/", server.page),
            Route("/videos/{name}", server.video),
            WebSocketRoute("/ws", server.websocket),
        ]
    )
    app.state.server = server
    return app
