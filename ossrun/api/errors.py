"""API errors and the two envelopes they travel in: Workers AI's v4 envelope and OpenAI's error object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error the client caused or must know about; `code` is the Workers AI error code."""

    def __init__(self, status: int, code: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}  # sent with the answer (a 415's Accept-Encoding)


def bad_input(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, 5006, f"AiError: Bad input: {message}", param)


def param_of(path: Sequence[str | int]) -> str | None:
    """OpenAI's `param` for a field's path in the body: `messages[0].content` for ("messages", 0, "content")."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or None


def unknown_model(model: str) -> ApiError:
    return ApiError(400, 5007, f"No such model {model} or task")


def context_too_long(prompt_tokens: int, max_tokens: int, limit: int, limit_name: str | None,
                     at_least: str | None = None) -> ApiError:
    """`limit_name`: the field the caller set the answer's limit with (`max_output_tokens` on Responses), None when it
    set none (its default was cut to the room left, so only the prompt can be too long). `at_least`: the prompt was
    refused before it was rendered, `prompt_tokens` being the fewest it can take, for the reason this says (its count
    of messages).

    The message opens with OpenAI's sentence ("This model's maximum context length is N tokens") and says "exceeds the
    context window": clients recognise a context overflow by those words alone (LiteLLM's ContextWindowExceededError,
    which DSPy and other agents catch to shorten their history; LangChain.js's ContextOverflowError), and code 8 is
    the contract's."""
    opening = f"AiError: This model's maximum context length is {limit} tokens"
    prompt, bound = f"{prompt_tokens} tokens", ""
    if at_least is not None:
        prompt, bound = f"at least {prompt_tokens} tokens: {at_least}", "at least "
    if limit_name is None:
        return ApiError(400, 8, f"{opening}: the prompt ({prompt}) fills the context window of {limit} "
                                "tokens, no room is left for an answer")
    return ApiError(400, 8, f"{opening}: prompt ({prompt}) + {limit_name} ({max_tokens}) = "
                            f"{bound}{prompt_tokens + max_tokens} exceeds the context window of {limit} tokens")


def too_large(limit: int) -> ApiError:
    """413 for a body over `limit` bytes (10 MB, or 300 MB on the adapter-upload route)."""
    return ApiError(413, 3006, f"Request is too large: the body exceeds {limit // 2**20} MB.")


def refused(status: int, message: str) -> ApiError:
    """A request the server's HTTP protocol refused (`connections.REFUSED`: malformed, a 400; its head too large, a
    431), answered in the surface's shape; the connection is closed after it (what follows on it cannot be framed)."""
    return ApiError(status, 5006 if status == 400 else 3006, message, headers={"Connection": "close"})


def unknown_lora(name: str) -> ApiError:
    return ApiError(400, 5005, f"AiError: the model does not support LoRA {name!r} (no such fine-tune, or it is not loadable)")


def rate_limited(per: str) -> ApiError:
    """`per`: what the limit counts requests of ("token", or "client address" without --api-token)."""
    return ApiError(429, 3036, f"Rate limit exceeded: too many requests for this {per}, try again later.")


def storage_refused(store: str, cause: str) -> ApiError:
    """503 for a write the data directory refused (a full disk, a read-only or failing filesystem): retryable once
    the operator frees space, and named, since a bare "internal error" tells neither the client nor the operator why.
    3040, as the other 503 (shutting down): the server cannot take the request now, the request is fine."""
    return ApiError(503, 3040, f"AiError: the storage of {store} cannot be written ({cause}); please try again later.")


AUTH_FAILED = (403, 10000, "Authentication error")
BUSY = (429, 3040, "Capacity temporarily exceeded, please try again.")
TIMEOUT = (408, 3007, "Request timeout.")
# Sent with the 408: the OpenAI and Cloudflare SDKs (Stainless) retry a 408 twice by default, and they read this header
# before the status. A request that ran out of time would run out again: each retry is another full generation, metered.
NO_RETRY = {"x-should-retry": "false"}
BODY_TIMEOUT = (408, 3007, "Request timeout: the request body did not arrive in time.")
# nginx's "client closed request": nobody reads it, but logs and metrics tell leaving clients apart.
CLIENT_GONE = (499, 3000, "Client closed the request.")
SHUTTING_DOWN = (503, 3040, "The server is shutting down, please try again.")


def envelope(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def envelope_error(error: ApiError) -> JSONResponse:
    body = {"result": {} if error.code != 10000 else None, "success": False,
            "errors": [{"code": error.code, "message": error.message}], "messages": []}
    return JSONResponse(body, status_code=error.status)


_OPENAI_TYPES = {400: "invalid_request_error", 403: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": openai_error_object(error)}, status_code=error.status)


def openai_unauthorized(token_given: bool) -> JSONResponse:
    """A missing or wrong token on the bare `/v1` surface: OpenAI's 401 (`invalid_api_key`), which the OpenAI SDKs raise as
    AuthenticationError (a 403 reads as PermissionDeniedError there). The account-prefixed routes keep Cloudflare's 403,
    code 10000."""
    message = ("Incorrect API key provided. This server takes the token it was started with (--api-token)." if token_given else
               "You didn't provide an API key: send it as 'Authorization: Bearer TOKEN' (the server's --api-token).")
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def openai_error_object(error: ApiError) -> dict[str, Any]:
    """OpenAI's `{message, type, param, code}` (the code a string), in a body or a stream's error frame."""
    return {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "server_error"), "param": error.param,
            "code": str(error.code)}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or "/ai/v1/" in path
