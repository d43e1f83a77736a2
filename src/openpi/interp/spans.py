"""Token span tables: which joint-sequence positions hold which camera, instruction words, template, state and
action tokens, computed from the config and the actual masks of one sample and stored with every recording."""
from __future__ import annotations

import numpy as np

from openpi.models.pi0 import token_spans


def _prompt_spans(p0: int, p1: int, prompt_length: int, instruction: tuple[int, int],
                  state_in_prompt: tuple[int, int] | None) -> dict:
    """Instruction / template / state-bin / pad spans of the prompt positions [p0, p1)."""
    if not 0 <= instruction[0] <= instruction[1] <= prompt_length <= p1 - p0:
        raise ValueError(f"inconsistent prompt layout: instruction {instruction}, prompt length {prompt_length}, "
                         f"max_token_len {p1 - p0}")
    spans: dict = {"instruction": [p0 + instruction[0], p0 + instruction[1]]}
    if state_in_prompt is None:
        spans["template"] = [[p0, p0 + instruction[0]], [p0 + instruction[1], p0 + prompt_length]]
    else:
        s0, s1 = state_in_prompt
        if not instruction[1] <= s0 <= s1 <= prompt_length:
            raise ValueError(f"inconsistent prompt layout: state bins {state_in_prompt} after instruction "
                             f"{instruction} within {prompt_length} tokens")
        spans["template"] = [[p0, p0 + instruction[0]], [p0 + instruction[1], p0 + s0], [p0 + s1, p0 + prompt_length]]
        spans["state"] = [p0 + s0, p0 + s1]
    spans["pad"] = [p0 + prompt_length, p1]
    return spans


def span_table(config, camera_valid: dict[str, bool], prompt_length: int,
               instruction: tuple[int, int], state_in_prompt: tuple[int, int] | None = None) -> dict:
    """JSON-able span table of one sample (format: docs/conventions.md).

    ``prompt_length``: valid prompt tokens; ``instruction``: [start, end) of the instruction words within the
    prompt positions; ``state_in_prompt``: [start, end) of Pi0.5's discretised state bins within the prompt, which
    then form the ``state`` span (Pi0's state is its suffix token). ``template`` holds the other valid prompt
    tokens (BOS, Pi0's newline, Pi0.5's "Task: ", ", State: ", ";\\nAction: "), ``pad`` the masked positions.
    """
    static = token_spans(config)
    if state_in_prompt is not None and static["state"][0] != static["state"][1]:
        raise ValueError(f"inconsistent prompt layout: state bins {state_in_prompt} in the prompt of a model with a "
                         "state token")
    spans = {key: list(static[key]) for key in config.image_keys}
    spans.update(_prompt_spans(*static["prompt"], prompt_length, instruction, state_in_prompt))
    if state_in_prompt is None:
        spans["state"] = list(static["state"])
    spans["actions"] = list(static["actions"])
    return {
        "model": config.model_type,
        "seq_len": config.prefix_len + config.suffix_len,
        "prefix_len": config.prefix_len,
        "grid": [config.grid, config.grid],
        "spans": spans,
        "camera_valid": {k: bool(camera_valid[k]) for k in config.image_keys},
    }


def fast_span_table(config, camera_valid: dict[str, bool], prompt_length: int, instruction: tuple[int, int],
                    state_in_prompt: tuple[int, int], *, max_decoding_steps: int, valid_steps: int,
                    action_steps: tuple[int, int]) -> dict:
    """Pi0-FAST's span table of one inference: the prefix as Pi0.5's (state bins in the prompt) plus the
    ``P + max_decoding_steps`` cache slots of the generated tokens, where slot ``P + s`` holds decoding step ``s``'s
    token. ``actions``: the steps ``action_steps`` = [a, b) that generated action tokens; ``generated``: the other
    executed steps ("Action: ", "|", end of sequence); slots after ``valid_steps`` join ``pad``.
    ``actions_are_chunk_rows`` is false: a FAST token is a compressed piece of the whole chunk, so action token j
    is *not* chunk action j (row labels then use the chunk as a whole; openpi.interp.join)."""
    from openpi.models.pi0 import prefix_spans

    static = prefix_spans(config)
    p = config.prefix_len
    a, b = action_steps
    if not 0 <= a <= b <= valid_steps <= max_decoding_steps:
        raise ValueError(f"inconsistent decoding layout: action steps {action_steps}, {valid_steps} executed steps "
                         f"of {max_decoding_steps}")
    spans = {key: list(static[key]) for key in config.image_keys}
    spans.update(_prompt_spans(*static["prompt"], prompt_length, instruction, state_in_prompt))
    spans["pad"] = [spans["pad"], [p + valid_steps, p + max_decoding_steps]]
    spans["generated"] = [[p, p + a], [p + b, p + valid_steps]]
    spans["actions"] = [p + a, p + b]
    return {
        "model": config.model_type,
        "seq_len": p + max_decoding_steps,
        "prefix_len": p,
        "grid": [config.grid, config.grid],
        "spans": spans,
        "camera_valid": {k: bool(camera_valid[k]) for k in config.image_keys},
        "valid_steps": int(valid_steps),
        "actions_are_chunk_rows": False,
    }


def key_valid_mask(table: dict) -> np.ndarray:
    """Boolean (seq_len,) mask of keys an attention row may put mass on (valid cameras, prompt, state, actions)."""
    valid = np.zeros(table["seq_len"], bool)
    for name, value in table["spans"].items():
        if name == "pad" or (name in table["camera_valid"] and not table["camera_valid"][name]):
            continue
        for a, b in span_pieces(value):
            valid[a:b] = True
    return valid


def span_pieces(value) -> list[tuple[int, int]]:
    """A span value ([a, b] or [[a, b], ...]) as a list of half-open pieces."""
    if len(value) and isinstance(value[0], (list, tuple)):
        return [(int(a), int(b)) for a, b in value]
    return [(int(value[0]), int(value[1]))]


def span_name_of(table: dict, index: int) -> str:
    """The span holding a joint-sequence index ('' if none)."""
    for name, value in table["spans"].items():
        if any(a <= index < b for a, b in span_pieces(value)):
            return name
    return ""
