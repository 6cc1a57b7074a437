"""Input errors raised below the HTTP layer; ``server`` turns them into OpenAI error JSON.

Each kind of error is built by one function here, named after its ``code``: call sites
give the facts (the limit, the field, which check failed), never their own message text
or code. ``param`` always names the offending request field, e.g.
``messages[0].content[1].image_url``.
"""

from __future__ import annotations


class InvalidRequest(Exception):
    """The client sent something we will not serve. Maps to HTTP 400 ``invalid_request_error``.

    ``param`` names the offending request field (e.g. ``messages[0].content[1].image_url``),
    ``code`` is a short machine-readable reason, or ``None``.
    """

    status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class MediaError(InvalidRequest):
    """An image could not be fetched, decoded or accepted (limits, SSRF policy, bad bytes)."""


class MediaTimeout(MediaError):
    """Fetching an image took longer than the configured timeout. Still a client-side 400."""


# What the model and the request may hold ---------------------------------------------------


def images_not_supported(param: str | None) -> InvalidRequest:
    """Images sent to a model without a vision tower."""
    return InvalidRequest("This model does not accept images.", param=param, code="images_not_supported")


def too_many_images(limit: int, count: int, param: str) -> InvalidRequest:
    """More images than ``limit`` in one request; ``param`` names the first one too many."""
    return InvalidRequest(
        f"At most {limit} images are allowed per request (got {count}).", param=param, code="too_many_images"
    )


def image_token_mismatch(placeholders: int, images: int) -> InvalidRequest:
    """The rendered prompt's image placeholders do not match the images (text held image tokens)."""
    return InvalidRequest(
        f"The prompt has {placeholders} image placeholders for {images} images; "
        "do not write image tokens in message text.",
        param="messages",
        code="image_token_mismatch",
    )


def no_chat_template() -> InvalidRequest:
    return InvalidRequest("This model has no chat template; use /v1/completions.", param="messages")


def template_rejected(reason: object) -> InvalidRequest:
    """The model's chat template raised on these messages (``reason``: its exception)."""
    return InvalidRequest(f"The chat template rejected the messages: {reason}", param="messages")


# Where an image comes from -----------------------------------------------------------------


def invalid_image_url(reason: str, param: str | None) -> MediaError:
    """A URL that names no image we could load; ``reason`` says what is wrong with it."""
    return MediaError(reason, param=param, code="invalid_image_url")


def unsupported_image_url_scheme(scheme: str, param: str, *, after_redirect: bool = False) -> MediaError:
    expected = "after a redirect (expected http(s):)" if after_redirect else "(expected data:, http(s): or file:)"
    return MediaError(
        f"unsupported image URL scheme {scheme!r} {expected}",
        param=param,
        code="unsupported_image_url_scheme",
    )


def media_url_forbidden(reason: str, param: str | None) -> MediaError:
    """A URL the server's media policy refuses (SSRF rules, local files off or outside the root)."""
    return MediaError(reason, param=param, code="media_url_forbidden")


def media_url_unresolvable(host: str, param: str | None) -> MediaError:
    return MediaError(f"image URL host {host!r} could not be resolved", param=param, code="media_url_unresolvable")


def image_not_found(param: str) -> MediaError:
    return MediaError("local image file not found", param=param, code="image_not_found")


def media_fetch_failed(reason: str, param: str) -> MediaError:
    """An http(s) fetch that failed: a non-2xx status, an encoding we refuse, a transport error."""
    return MediaError(reason, param=param, code="media_fetch_failed")


def media_fetch_timeout(reason: str, param: str) -> MediaTimeout:
    return MediaTimeout(reason, param=param, code="media_fetch_timeout")


def media_too_many_redirects(limit: int, param: str) -> MediaError:
    return MediaError(f"image URL redirected more than {limit} times", param=param, code="media_too_many_redirects")


# What an image holds -----------------------------------------------------------------------


def image_too_large(limit_bytes: int, param: str) -> MediaError:
    """An image's bytes (decoded, or certainly so before decoding) exceed ``limit_bytes``."""
    return MediaError(f"image is larger than the limit of {limit_bytes} bytes", param=param, code="image_too_large")


def image_too_many_pixels(param: str, size: tuple[int, int] | None = None, limit: int | None = None) -> MediaError:
    """An image whose width x height exceeds the pixel limit (``size`` and ``limit`` when known)."""
    if size is None or limit is None:
        message = "image has too many pixels"
    else:
        message = f"image is {size[0]}x{size[1]} pixels, more than the limit of {limit}"
    return MediaError(message, param=param, code="image_too_large")


def invalid_image(reason: str, param: str) -> MediaError:
    """Bytes that are not an accepted image: empty, unknown format, corrupt or truncated."""
    return MediaError(reason, param=param, code="invalid_image")


def invalid_base64(param: str) -> MediaError:
    return MediaError("image data is not valid base64", param=param, code="invalid_base64")


# Failures on the server's side -------------------------------------------------------------


class PrepFailed(Exception):
    """Preparation failed for a reason of the server's, not the request's: an HTTP 500 (the
    server's catch-all handler logs it). Only the call that met it fails."""


def prep_process_died(exitcode: int | None) -> PrepFailed:
    """The prep worker process running a step died before returning (``exitcode``: its exit
    status, negative for a signal, ``None`` if unknown); the pool replaces it."""
    how = "without an exit status" if exitcode is None else f"with exit status {exitcode}"
    if exitcode is not None and exitcode < 0:
        how = f"from signal {-exitcode}"
    return PrepFailed(f"a prep worker process died {how} while preparing this request")
