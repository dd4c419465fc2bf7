"""When a sequence is done: EOS, stop token ids, stop strings, max_tokens, context length."""
from __future__ import annotations

from aphrodite.engine.request import Request, RequestStatus


def check_stop_token(req: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """Status to finish with after ``token`` was appended, judged on token ids alone."""
    p = req.params
    num_tokens = len(req.all_token_ids)     # attributes, not Request's properties: runs per token
    num_output = num_tokens - req.num_prompt_tokens
    if num_output >= p.min_tokens:
        if not p.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if p.stop_token_ids and token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if req.max_tokens is not None and num_output >= req.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def find_stop_string(text: str, new_chars: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """The first stop string that ends in the newest ``new_chars`` characters of ``text``.

    Returns (stop string, length to truncate ``text`` to), or None. Only the tail that could
    contain a new match is searched, so a stop string split across tokens is still found.
    """
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    if best is None:
        return None
    stop, idx = best
    return stop, idx + len(stop) if include else idx
