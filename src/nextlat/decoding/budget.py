"""How many new tokens fit in a model's context after the prompt and speculative decoding's draft room."""

from __future__ import annotations


def draft_room(gamma: int) -> int:
    """Positions past the new tokens that speculative decoding with draft length ``gamma`` needs."""
    return 2 * (gamma + 1)


def _either(names: list[str]) -> str:
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def new_token_budget(asked: int | None, prompt_len: int, room: int, max_seq_len: int, *, default: int,
                     lower: list[str]) -> int:
    """New tokens to decode after a ``prompt_len``-token prompt with ``room`` positions of draft room: ``asked``,
    or ``default`` cut to what fits when ``asked`` is None. ``lower``: what the caller can lower besides the
    number of new tokens (e.g. ``["--prompt", "--gamma"]``), named by the ValueError raised when it does not fit."""
    fits = max_seq_len - prompt_len - room
    draft = f" + {room} of draft room" if room else ""
    if asked is None:
        if fits < 1:
            raise ValueError(f"{prompt_len} prompt tokens{draft} leave no room for new tokens in "
                             f"model.max_seq_len={max_seq_len}; lower {_either(lower)}")
        return min(default, fits)
    if asked > fits:
        room_left = f"at most {fits} new tokens fit" if fits >= 1 else "no new token fits"
        raise ValueError(f"{prompt_len} prompt tokens + {asked} new tokens{draft} exceed model.max_seq_len="
                         f"{max_seq_len} ({room_left}); lower {_either(['--max-new-tokens', *lower])}")
    return asked
