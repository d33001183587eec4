"""``matten play``: a long-video model steered live in the browser (:mod:`matten.play.app`)."""

from .app import MAX_MESSAGE_BYTES, PlayError, create_app, load_playable

__all__ = ["MAX_MESSAGE_BYTES", "PlayError", "create_app", "load_playable"]
