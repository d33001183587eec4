"""Guidance on per-frame actions: action dropout teaches a null action, and sampling moves each
denoising step away from it, in a stream that still continues exactly after save and load."""

from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient
from test_sample import sample_cli  # the sample command as the sampling tests run it
from test_session import TINY_LONG  # the tiny long-video run the session tests share

from matten import cli
from matten.commands import play as play_command
from matten.config import ConfigError, load_config
from matten.data import read_video
from matten.diffusion import action_guidance, create_diffusion
from matten.models.causal import create_causal_model
from matten.models.embeddings import ActionEmbedder
from matten.pipelines import LongVideoPipeline, SamplingError
from matten.pipelines.long_sampling import sample_chunk
from matten.pipelines.session import StreamingSession
from matten.training import train

CAUSAL = Path(__file__).parent / "fixtures" / "causal_run"  # trained without action dropout


def test_action_dropout_adds_a_null_action_used_in_training_only():
    torch.manual_seed(0)
    embedder = ActionEmbedder(8, num_actions=3, dropout_prob=0.5)
    assert embedder.null_action == 3 and embedder.embed.num_embeddings == 4
    actions = torch.ones(4, 16, dtype=torch.long)
    weight = embedder.embed.weight
    out = embedder(actions, 4, 16)
    is_null = (out == weight[3]).all(-1)
    assert ((out == weight[1]).all(-1) | is_null).all()  # each frame: its action or the null
    assert 0.3 < is_null.float().mean() < 0.7
    with pytest.raises(ValueError, match=r"actions must be in \[0, 3\)"):
        embedder(torch.full((1, 2), 3), 1, 2)  # training data never carry the null action
    embedder.eval()
    assert (embedder(actions, 4, 16) == weight[1]).all()  # never dropped when sampling
    assert (embedder(torch.full((1, 2), 3), 1, 2) == weight[3]).all()  # the null, asked for

    plain = ActionEmbedder(8, num_actions=3)
    assert plain.null_action is None and plain.embed.num_embeddings == 3
    with pytest.raises(ValueError, match=r"actions must be in \[0, 3\)"):
        plain(torch.full((1, 2), 3), 1, 2)
    with pytest.raises(ValueError, match="only for discrete"):
        ActionEmbedder(8, action_dim=2, dropout_prob=0.1)


def test_action_guidance_extrapolates_eps_from_the_null_action():
    calls = []

    def model(x, t, actions, y=None):
        calls.append(actions.clone())
        eps = actions.float().mean(1).view(-1, 1, 1, 1, 1).expand_as(x)
        variance = torch.full_like(x, 7.0) + actions.float().sum()  # conditional's kept
        return torch.cat([eps, variance], dim=1)

    x, t = torch.zeros(2, 3, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    actions = torch.tensor([[2], [4]])
    out = action_guidance(model, 3.0, null_action=5)(x, t, actions=actions, y=None)
    assert torch.equal(calls[1], torch.full_like(actions, 5))
    cond, uncond = actions.float().view(-1, 1, 1, 1, 1), 5.0
    assert torch.allclose(out[:, :3], (uncond + 3.0 * (cond - uncond)).expand(-1, 3, 1, 2, 2))
    assert torch.equal(out[:, 3:], model(x, t, actions)[:, 3:])
    calls.clear()
    action_guidance(model, 1.0, null_action=5)(x, t, actions=actions)
    assert len(calls) == 1  # scale 1: the conditional model alone


DROPOUT_RUN = [
    *TINY_LONG,
    "model.causal.memory=none",
    "model.causal.action_dropout_prob=0.2",
    "sample.action_cfg_scale=3.0",
]


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """A 1-step tiny long-video run trained with action dropout, sampled with guidance 3."""
    run = tmp_path_factory.mktemp("action-dropout") / "run"
    train(load_config("long", DROPOUT_RUN), output=run, progress=False)
    return run


def test_scale_zero_is_the_null_action_and_other_scales_steer(dropout_run):
    pipe = LongVideoPipeline.from_pretrained(dropout_run, device="cpu")
    model, null = pipe.model, pipe.model.null_action
    torch.manual_seed(0)
    with torch.no_grad():  # after one step adaLN-Zero's gates are near 0: actions barely count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert null == 6  # after stay, left, right, up, down, dark
    diffusion = pipe.respaced_diffusion(2)

    def frame(actions, scale):
        generator = torch.Generator().manual_seed(0)
        return sample_chunk(
            model,
            diffusion,
            model.init_state(1),
            1,
            pipe.latent_shape(),
            actions=torch.tensor([[actions]]),
            action_cfg_scale=scale,
            generator=generator,
        )[0]

    assert torch.equal(frame(2, 0.0), frame(null, 1.0))  # scale 0: the unconditional model
    assert not torch.equal(frame(2, 3.0), frame(2, 1.0))
    with pytest.raises(ValueError, match="action dropout"):
        no_null = LongVideoPipeline.from_pretrained(CAUSAL, device="cpu").model
        sample_chunk(
            no_null,
            diffusion,
            no_null.init_state(1),
            1,
            pipe.latent_shape(),
            actions=torch.tensor([[2]]),
            action_cfg_scale=2.0,
        )


def test_a_guided_stream_continues_exactly_and_refuses_where_it_cannot_guide(dropout_run, tmp_path):
    session = StreamingSession.start(dropout_run, seed=5, steps=1)
    assert session.action_cfg_scale == 3.0  # the run's sample.action_cfg_scale
    assert session.state.batch == 1  # guidance on actions does not double the state
    for action in ("right", "right"):
        session.step(action=action)
    session.save_state(tmp_path / "s.safetensors")
    whole = [session.step(action=a, output_type="pt")[0] for a in ("left", "up")]
    other = StreamingSession.start(dropout_run, seed=0, steps=1, action_cfg_scale=1.0)
    other.load_state(tmp_path / "s.safetensors")
    assert other.action_cfg_scale == 3.0
    continued = [other.step(action=a, output_type="pt")[0] for a in ("left", "up")]
    assert all(torch.equal(a, b) for a, b in zip(whole, continued, strict=True))

    with pytest.raises(SamplingError, match="unknown action"):
        session.step(action=session.model.null_action)  # the null is guidance's, not a move
    with pytest.raises(SamplingError, match="--action-cfg-scale"):
        StreamingSession.start(dropout_run, action_cfg_scale=-1.0)
    with pytest.raises(SamplingError, match="no null action"):
        StreamingSession.start(CAUSAL, action_cfg_scale=2.0)
    assert StreamingSession.start(CAUSAL).action_cfg_scale == 1.0


def test_action_dropout_and_its_guidance_are_checked_in_the_config():
    for overrides in (
        ["model.causal.action_dropout_prob=1.0"],
        ["model.causal.num_actions=0", "model.causal.action_dropout_prob=0.1"],
        ["sample.action_cfg_scale=2.0"],  # no null action to guide against
    ):
        with pytest.raises(ConfigError, match="action_dropout_prob"):
            load_config("long", overrides).validate()
    with pytest.raises(ConfigError, match="sample.action_cfg_scale"):
        load_config(
            "long", ["model.causal.action_dropout_prob=0.1", "sample.action_cfg_scale=-1"]
        ).validate()


def test_a_run_resumes_with_another_dropout_but_not_without_the_null_action(dropout_run):
    from matten.training import SetupError

    resumed = train(
        load_config(
            "long", [*DROPOUT_RUN, "model.causal.action_dropout_prob=0.1", "train.max_steps=2"]
        ),
        output=dropout_run.parent / "resumed",
        resume=str(dropout_run),
        progress=False,
    )
    assert resumed.step == 2  # accepted: the same weights, trained on with the new dropout
    with pytest.raises(SetupError, match="action_dropout_prob"):
        train(
            load_config(
                "long",
                [*DROPOUT_RUN, "model.causal.action_dropout_prob=0", "sample.action_cfg_scale=1"]
                + ["train.max_steps=2"],
            ),
            output=dropout_run.parent / "refused",
            resume=str(dropout_run),
            progress=False,
        )


def test_action_guidance_composes_with_class_guidance_on_a_doubled_state():
    torch.manual_seed(0)
    model = create_causal_model(
        in_channels=3,
        depth=1,
        hidden_size=32,
        num_heads=2,
        num_classes=3,
        num_actions=4,
        action_dropout_prob=0.1,
        window=2,
        memory="none",
        input_size=[8, 8],
    ).eval()
    with torch.no_grad():  # a fresh adaLN-Zero ignores its conditions: make them count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    diffusion = create_diffusion("2", learn_sigma=True)
    labels, history = torch.tensor([1]), torch.randn(1, 3, 2, 8, 8)
    state = model.init_state(2)  # the class guidance's unconditional half
    state = model.commit(
        history.repeat(2, 1, 1, 1, 1),
        torch.zeros(2, 2, dtype=torch.long),
        state,
        y=torch.tensor([1, 3]),
        actions=torch.tensor([[2, 2], [2, 2]]),
    )

    def frames(actions, scale):
        return sample_chunk(
            model,
            diffusion,
            state,
            2,
            (3, 8, 8),
            labels=labels,
            actions=torch.tensor([actions]),
            cfg_scale=2.0,
            action_cfg_scale=scale,
            generator=torch.Generator().manual_seed(0),
        )[0]

    null = model.null_action
    assert torch.equal(frames([2, 1], 0.0), frames([null, null], 1.0))
    assert not torch.equal(frames([2, 1], 2.0), frames([2, 1], 1.0))


def test_matten_sample_guides_a_long_video_on_its_actions(dropout_run, tmp_path, capsys):
    def sample(run, *extra):  # one video, one step (given after sample_cli's, they win)
        return sample_cli(run, tmp_path / "v.mp4", "--num-samples", "1", "--steps", "1", *extra)

    guided = ["--frames", "3", "--chunk-size", "1", "--action-cfg-scale", "2"]
    assert sample(dropout_run, *guided) == 0
    assert len(read_video(tmp_path / "v.mp4")) == 3
    for run, extra, message in (
        (CAUSAL, guided, "no null action"),
        (dropout_run, ["--action-cfg-scale", "2"], "it needs --frames"),
    ):
        with pytest.raises(SystemExit) as info:
            sample(run, *extra)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_matten_play_streams_with_the_guidance_asked(dropout_run, tmp_path, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr(play_command.uvicorn, "run", lambda app, **kw: served.update(app=app))
    play = ["play", "--output", str(tmp_path), "--device", "cpu", "--action-cfg-scale", "2"]
    assert cli.main(play + ["--checkpoint", str(dropout_run)]) == 0
    with TestClient(served["app"]) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["action_cfg_scale"] == 2.0  # the hello
        assert ws.receive_json()["type"] == "frame"
    assert cli.main(play + ["--checkpoint", str(CAUSAL)]) == 2
    assert "no null action" in capsys.readouterr().err
