"""`matten play`'s server in-process (starlette's TestClient): the page, the websocket protocol,
bad input answered on the socket while the stream goes on, the bound on live streams, and the
command's refusals and warning."""

import contextlib
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from starlette.testclient import TestClient

from matten.cli import main
from matten.commands import play as play_command
from matten.config import load_config
from matten.pipelines import LongVideoPipeline
from matten.play import MAX_MESSAGE_BYTES, PlayError, create_app, load_playable
from matten.training import train

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def pipe():
    return LongVideoPipeline.from_pretrained(FIXTURES / "causal_run", device="cpu")


@pytest.fixture
def client(pipe, tmp_path):
    app = create_app(pipe, tmp_path / "out", max_streams=2)
    with TestClient(app) as client:
        yield client


def receive(ws, kind, limit=200):
    """The next message of type ``kind``, skipping frames (the stream keeps streaming)."""
    for _ in range(limit):
        message = ws.receive_json()
        if message["type"] == kind:
            return message
        assert message["type"] == "frame", message
    raise AssertionError(f"no {kind!r} message in {limit}")


@contextlib.contextmanager
def connect(client):
    """An open stream at 1 DDIM step (fast frames) and its hello."""
    with client.websocket_connect("/ws") as ws:
        hello = ws.receive_json()
        ws.send_json({"type": "steps", "steps": 1})
        assert receive(ws, "steps")["steps"] == 1
        yield ws, hello


def test_the_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # no CDN
    assert "<link" not in page.text and "<script src" not in page.text


def test_hello_then_frames_with_their_metadata(client):
    with connect(client) as (ws, hello):
        assert hello["type"] == "hello" and hello["actions"][:3] == ["stay", "left", "right"]
        assert hello["classes"] == [] and hello["snapshots"] == []
        first, second = receive(ws, "frame"), receive(ws, "frame")
        assert second["frame"] > first["frame"] and first["width"] == first["height"] == 8
        assert first["png"] and first["ms"] > 0 and first["action_name"] == "stay"


def test_actions_change_the_applied_action(client):
    with connect(client) as (ws, _):
        for name in ("right", "left"):
            ws.send_json({"type": "action", "action": name})
            for _ in range(50):
                frame = receive(ws, "frame")
                if frame["action_name"] == name:
                    break
            assert frame["action_name"] == name


BAD = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    ('{"type": "fly"}', "unknown message type"),
    ('{"type": "action", "action": "jump"}', "unknown action"),
    ('{"type": "action", "action": 99}', "unknown action"),
    ('{"type": "class", "class": 0}', "unconditional"),
    ('{"type": "steps", "steps": 0}', "steps"),
    ('{"type": "steps", "steps": "x"}', "steps"),
    ('{"type": "action", "action": "' + "x" * MAX_MESSAGE_BYTES + '"}', "too long"),
    ('{"type": "snapshot", "name": "../escape"}', "snapshot name"),
    ('{"type": "snapshot", "name": "a/b"}', "snapshot name"),
    ('{"type": "snapshot", "name": "a\\\\b"}', "snapshot name"),
    ('{"type": "snapshot", "name": "' + "n" * 65 + '"}', "snapshot name"),
    ('{"type": "restore", "name": "/etc/passwd"}', "snapshot name"),
    ('{"type": "restore", "name": "missing"}', "no snapshot named"),
]


def test_bad_input_gets_an_error_and_the_stream_goes_on(client, tmp_path):
    with connect(client) as (ws, _):
        ws.send_json({"type": "pause"})
        receive(ws, "paused")
        for text, message in BAD:
            ws.send_text(text)
            reply = receive(ws, "error")
            assert message in reply["message"], (text, reply)
        ws.send_bytes(b"\x00\x01")
        assert "binary" in receive(ws, "error")["message"]
        assert not (tmp_path / "escape.safetensors").exists()
        assert not (tmp_path / "out" / "escape.safetensors").exists()
        ws.send_json({"type": "resume"})
        before = receive(ws, "resumed")["frame"]
        assert receive(ws, "frame")["frame"] == before  # the same stream, going on


def test_snapshot_and_restore_replay_the_same_frames(client, tmp_path):
    with connect(client) as (ws, _):
        ws.send_json({"type": "action", "action": "right"})
        receive(ws, "frame")
        ws.send_json({"type": "snapshot", "name": "start"})
        snap = receive(ws, "snapshot")
        assert (tmp_path / "out" / "snapshots" / "start.safetensors").is_file()
        after = [receive(ws, "frame") for _ in range(2)]
        assert after[0]["frame"] == snap["frame"]
        ws.send_json({"type": "restore", "name": "start"})
        assert receive(ws, "restored")["frame"] == snap["frame"]
        replay = receive(ws, "frame")
        assert replay["frame"] == snap["frame"] and replay["png"] == after[0]["png"]
        ws.send_json({"type": "list"})
        assert receive(ws, "snapshots")["names"] == ["start"]


def test_save_video_offers_an_mp4(client):
    with connect(client) as (ws, _):
        receive(ws, "frame")
        ws.send_json({"type": "save_video"})
        video = receive(ws, "video")
        assert video["frames"] >= 1 and video["url"].endswith(".mp4")
        download = client.get(video["url"])
        assert download.status_code == 200 and len(download.content) > 0
        assert client.get("/videos/..%2F..%2Fsecret.mp4").status_code == 404


def test_live_streams_are_bounded_and_a_closed_tab_frees_its_stream(client):
    with connect(client):
        with connect(client), client.websocket_connect("/ws") as third:
            busy = third.receive_json()
            assert busy["type"] == "busy" and "busy" in busy["message"]
        # One tab closed: a new one gets a stream (once the server has seen the close).
        for _ in range(1000):
            with client.websocket_connect("/ws") as again:
                if again.receive_json()["type"] == "hello":
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the closed tab's stream was never freed")


@pytest.fixture(scope="module")
def class_pipe(tmp_path_factory):
    """A 1-step tiny class-conditional long-video model without actions."""
    overrides = [
        "model.depth=1",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.causal.window=2",
        "model.causal.num_actions=0",
        "data.name=synthetic",
        "data.num_classes=4",
        "model.num_classes=4",
        "data.num_frames=4",
        "data.num_videos=4",
        "data.resolution=8",
        "train.batch_size=2",
        "train.max_steps=1",
        "train.cpu=true",
        "train.sample_every=0",
    ]
    run = tmp_path_factory.mktemp("classes") / "run"
    train(load_config("long", overrides), output=run, progress=False)
    return LongVideoPipeline.from_pretrained(run, device="cpu")


def test_a_model_without_actions_plays_with_its_classes(class_pipe, tmp_path):
    with TestClient(create_app(class_pipe, tmp_path)) as client, connect(client) as (ws, hello):
        assert hello["actions"] == [] and hello["classes"][3] == "orbit"
        ws.send_json({"type": "action", "action": "left"})
        assert "no actions" in receive(ws, "error")["message"]
        ws.send_json({"type": "class", "class": "nope"})
        assert "not a class" in receive(ws, "error")["message"]
        ws.send_json({"type": "class", "class": "orbit"})
        for _ in range(50):
            frame = receive(ws, "frame")
            if frame["class_name"] == "orbit":
                break
        assert frame["class_name"] == "orbit" and frame["action"] is None


def test_a_clip_checkpoint_is_refused(capsys):
    with pytest.raises(PlayError, match="only long-video models can play"):
        load_playable(FIXTURES / "clip_run", device="cpu")
    assert main(["play", "--checkpoint", str(FIXTURES / "clip_run")]) == 2
    assert "Matten-Causal" in capsys.readouterr().err


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_another_host_than_localhost_is_warned_about(monkeypatch, capsys, tmp_path, host, warns):
    served = {}
    monkeypatch.setattr(play_command.uvicorn, "run", lambda app, **kw: served.update(kw))
    assert (
        main(
            [
                "play",
                "--checkpoint",
                str(FIXTURES / "causal_run"),
                "--host",
                host,
                "--output",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert served["host"] == host and served["port"] == 8765
    assert ("no authentication" in capsys.readouterr().err) == warns


def test_bad_steps_are_refused_at_start(capsys):
    assert (
        main(
            [
                "play",
                "--checkpoint",
                str(FIXTURES / "causal_run"),
                "--steps",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "--steps must be in [1, 1000]" in capsys.readouterr().err


def test_the_streams_start_at_the_steps_given(pipe, tmp_path):
    with (
        TestClient(create_app(pipe, tmp_path, steps=3)) as client,
        client.websocket_connect("/ws") as ws,
    ):
        assert ws.receive_json()["steps"] == 3
        assert receive(ws, "frame")["steps"] == 3


# The real-browser test: headless Chromium (Debian's chromium and chromium-driver, which .ci/run
# installs and then requires with MATTEN_BROWSER_TEST=1) driven by selenium against a server.
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BROWSER_REQUIRED = os.environ.get("MATTEN_BROWSER_TEST") == "1"


@pytest.fixture
def served(pipe, tmp_path):
    """A real server (uvicorn, in a thread) on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(pipe, tmp_path / "out"), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.mark.skipif(
    not BROWSER_REQUIRED and not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromium-driver (.ci/run installs them)",
)
def test_the_page_plays_in_a_real_browser(served, tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "MATTEN_BROWSER_TEST=1: chromium or chromedriver missing"
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    wait = WebDriverWait(driver, 120)
    text = lambda id_: driver.find_element(By.ID, id_).text  # noqa: E731
    try:
        driver.get(served)
        wait.until(lambda _: text("status").startswith("live"))
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2", Keys.ENTER)  # quicker frames
        wait.until(lambda _: int(text("frames")) >= 3)
        wait.until(lambda _: int(text("fps")) > 0 and text("p50") != "-")
        seen = int(text("frames"))
        wait.until(lambda _: int(text("frames")) > seen)  # frames keep arriving
        body = driver.find_element(By.TAG_NAME, "body")
        for key, name in ((Keys.ARROW_RIGHT, "right"), (Keys.ARROW_LEFT, "left")):
            webdriver.ActionChains(driver).key_down(key, body).perform()
            wait.until(lambda _, name=name: text("applied") == name)
            webdriver.ActionChains(driver).key_up(key, body).perform()
        driver.find_element(By.ID, "snapshot-name").send_keys("browser")
        driver.find_element(By.ID, "snapshot").click()
        wait.until(lambda _: text("status").startswith("snapshot browser"))
        wait.until(lambda _: "browser" in text("snapshots"))
        Select(driver.find_element(By.ID, "snapshots")).select_by_value("browser")
        driver.find_element(By.ID, "restore").click()
        wait.until(lambda _: text("status").startswith("restored browser"))
        assert (tmp_path / "out" / "snapshots" / "browser.safetensors").is_file()
    finally:
        driver.quit()
