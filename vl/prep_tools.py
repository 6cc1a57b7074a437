"""The synchronous preparation work of a request, the typed steps that ask for it, and
where it runs.

``PrepTools`` holds the tokenizer, the media policy and (for VL models) the image
preprocessor, and does the blocking work: chat-template rendering and tokenization,
detokenization, image decode and preprocessing. The event loop never calls it directly:
the preparer builds a step (``RenderChat``, ``RenderChats``, ``Tokenize``, ``Detokenize``, ``ImagePixels``:
small, picklable values whose type says what to do) and hands it with a gate to a
``PrepRunner``, which runs ``step.run(tools)`` holding one token of that gate: in a worker
thread of the server process (``ThreadPrep``, here) or in a prep worker process
(``vl.prep_processes.ProcessPrep``, which builds its own tools from a ``PrepToolsSpec``).
Gates, their statistics and their cancellation guarantees are the same for both (see
``vl.gates``).

Image pixels leave a prep process through shared memory: the caller acquires a pixel slot
(``engine.pixel_slots.SlotPool``) and passes its index and the pool's ``SlotSpec`` in the
``ImagePixels`` step, which writes the pixels there and returns only a small ``SlotImage``.
The caller owns the slot: it releases it on every path, and never before the step has
returned (a runner waits for started work to finish, also when cancelled).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from engine.pixel_slots import SlotMemory, SlotSpec
from vl.content_format import flatten_content, template_takes_parts
from vl.errors import InvalidRequest, images_not_supported, no_chat_template, template_rejected
from vl.gates import BorrowTimes, Gate
from vl.image_pixels import ImagePreprocessor, PixelInputs, SlotImage, decode_image
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy
from vl.pixel_budget import PixelBounds
from vl.qwen2_vl_pixels import PixelSettings
from vl.text_tokenizer import TextTokenizer, TokenizerSnapshot
from vl.tool_prompt import hermes_messages, template_renders_tools

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class PrepTools:
    """Tokenizer, template and image work. Not thread-safe: each gate's capacity decides how
    many threads may use one instance at once (HF fast tokenizers are not thread-safe);
    ``slot_memory`` and the slot writes of different slots are safe from several threads.

    ``slot_memories``: views of pixel-slot segments this process already has, used instead
    of attaching again: in the server process, the ``SlotPool``'s own ``memory``."""

    def __init__(
        self,
        tokenizer: Any,
        policy: MediaPolicy,
        preprocessor: ImagePreprocessor | None = None,
        *,
        slot_memories: Iterable[SlotMemory] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.policy = policy
        self.preprocessor = preprocessor
        self._slot_memories = {memory.spec: memory for memory in slot_memories}
        self._attach_lock = threading.Lock()
        self._content_format: tuple[str, bool] | None = None  # (template, takes parts): parsed once

    def _takes_parts(self, template: str) -> bool:
        if self._content_format is None or self._content_format[0] is not template:
            self._content_format = (template, template_takes_parts(template))
        return self._content_format[1]

    def render_and_tokenize(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the chat template rendered with a generation prompt.

        ``tools`` go to the template's ``tools`` variable; a template that does not use
        that variable gets the chat rewritten with the default tool prompt instead
        (``vl.tool_prompt``); a template that does not iterate over content parts gets
        each part list as one string (``vl.content_format``). Raises ``InvalidRequest`` (param ``messages``) when the model
        has no chat template or the template rejects the messages."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise no_chat_template()
        extra = {}
        if isinstance(template, str) and not template_renders_tools(template):
            messages = hermes_messages(messages, tools)
        elif tools:
            extra["tools"] = tools
        if isinstance(template, str) and not self._takes_parts(template):
            messages = flatten_content(messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as exc:  # jinja errors: the template rejected these messages
            raise template_rejected(exc) from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; ids outside the tokenizer's vocabulary are skipped."""
        vocab = len(self.tokenizer)
        return self.tokenizer.decode([t for t in token_ids if 0 <= t < vocab])

    def decode_and_preprocess(self, image: EncodedImage, param: str, bounds: PixelBounds | None = None) -> PixelInputs:
        """Decode ``image`` under the media policy and turn it into the vision tower's
        patches. Raises ``MediaError`` naming ``param`` for bytes that are not an accepted
        image."""
        if self.preprocessor is None:
            raise images_not_supported(param)
        return self.preprocessor(decode_image(image, self.policy, param=param), bounds)

    def pixels_into_slot(
        self, image: EncodedImage, param: str, slot_index: int, slots: SlotSpec, bounds: PixelBounds | None = None
    ) -> SlotImage:
        """``decode_and_preprocess``, then write the pixels into slot ``slot_index`` of the
        pool ``slots``; the ``SlotImage`` says how long decoding and preprocessing (with the
        write) took. Raises what ``decode_and_preprocess`` raises, and ``SlotTooSmall``
        for pixels larger than a slot (the slot is then left as it was)."""
        if self.preprocessor is None:
            raise images_not_supported(param)
        started = time.perf_counter()
        decoded = decode_image(image, self.policy, param=param)
        decoded_at = time.perf_counter()
        memory = self.slot_memory(slots)
        # the fast path writes the values straight into the slot; ``write`` then copies nothing
        inputs = self.preprocessor(decoded, bounds, out=lambda shape: memory.array_view(slot_index, shape))
        pixels = memory.write(slot_index, inputs.pixel_values)
        grid_thw, num_patches = inputs.grid_thw, inputs.num_patches
        del inputs  # holds the slot's view: dropped here, so the mapping can be closed
        return SlotImage(
            pixels=pixels,
            grid_thw=grid_thw,
            num_patches=num_patches,
            decode_seconds=decoded_at - started,
            preprocess_seconds=time.perf_counter() - decoded_at,
        )

    def slot_memory(self, spec: SlotSpec) -> SlotMemory:
        """This process's view of the pool ``spec``: one given at construction, else
        attached on first use (once, whatever the threads) and kept for the tools' life; the
        mapping goes with the process (attaching registers nothing that would unlink the
        segment, see ``SlotMemory.attach``)."""
        memory = self._slot_memories.get(spec)
        if memory is None:
            with self._attach_lock:
                memory = self._slot_memories.get(spec)
                if memory is None:
                    memory = self._slot_memories[spec] = SlotMemory.attach(spec)
        return memory


# The steps: what a runner can be asked to run ------------------------------------------------


class PrepStep(Protocol[T_co]):
    """One piece of preparation work; must pickle (it may run in a prep worker process)."""

    def run(self, tools: PrepTools) -> T_co: ...


@dataclass(frozen=True)
class RenderChat:
    """Render ``messages`` (``Chat.template_messages()``) with the chat template and tokenize;
    the tools are those the messages carry (``TemplateMessages.tools``), if any."""

    messages: list[dict]

    def run(self, tools: PrepTools) -> list[int]:
        return tools.render_and_tokenize(self.messages, getattr(self.messages, "tools", None))


@dataclass(frozen=True)
class RenderChats:
    """``RenderChat`` for each of ``chats`` in one call (``vl.render_batcher``): each chat's
    outcome on its own, its token ids or the ``InvalidRequest`` its template raised."""

    chats: tuple[list[dict], ...]

    def run(self, tools: PrepTools) -> list[list[int] | InvalidRequest]:
        outcomes: list[list[int] | InvalidRequest] = []
        for messages in self.chats:
            try:
                outcomes.append(RenderChat(messages).run(tools))
            except InvalidRequest as exc:
                outcomes.append(exc)
        return outcomes


@dataclass(frozen=True)
class Tokenize:
    text: str
    add_special_tokens: bool = True

    def run(self, tools: PrepTools) -> list[int]:
        return tools.encode(self.text, self.add_special_tokens)


@dataclass(frozen=True)
class Detokenize:
    token_ids: list[int]

    def run(self, tools: PrepTools) -> str:
        return tools.decode(self.token_ids)


@dataclass(frozen=True)
class ImagePixels:
    """Decode and preprocess one image into pixel slot ``slot_index`` of the pool ``slots``
    and return its ``SlotImage`` (small: the pixels stay in the slot); errors name
    ``param``. The image is resized to within ``bounds`` (``vl.pixel_budget``; ``None``:
    the image processor's own). The caller holds the slot."""

    image: EncodedImage
    param: str
    slot_index: int
    slots: SlotSpec
    bounds: PixelBounds | None = None

    def run(self, tools: PrepTools) -> SlotImage:
        return tools.pixels_into_slot(self.image, self.param, self.slot_index, self.slots, self.bounds)


# Where steps run ----------------------------------------------------------------------------


class PrepRunner(Protocol):
    async def run(self, gate: Gate, step: PrepStep[T], times: BorrowTimes | None = None) -> T:
        """Run ``step`` holding a token of ``gate``; return or raise its outcome. ``times``
        (if given) gets when the token was asked for, taken and given back (``Gate.run``).
        Cancellation: as ``Gate.run`` (work that started is finished)."""
        ...


class ThreadPrep:
    """Runs steps in worker threads of the server process, on ``tools``."""

    def __init__(self, tools: PrepTools) -> None:
        self.tools = tools

    async def run(self, gate: Gate, step: PrepStep[T], times: BorrowTimes | None = None) -> T:
        return await gate.run(step.run, self.tools, times=times)


@dataclass(frozen=True)
class PrepToolsSpec:
    """What a prep worker process needs to build its own ``PrepTools``: picklable, and
    hashable so a process can keep the tools it built for a spec.

    ``merge_size`` is the vision tower's spatial merge size, or ``None`` for a model
    without images (no image processor is loaded then). ``pixel_settings``: the server's
    processor's fast-path settings (``vl.qwen2_vl_pixels``), with which the process builds
    its preprocessor without loading the processor (nor the modules it imports); ``None``:
    it loads the processor. ``tokenizer``: the server's tokenizer as a
    ``vl.text_tokenizer.TokenizerSnapshot``, which the process rebuilds without torch;
    ``None``: it loads the tokenizer with transformers.

    The snapshot is large (the whole tokenizer pipeline) and is left out of equality, hash
    and pickling: a spec travels with every call a prep process runs, the snapshot once,
    beside it, when the process starts (``vl.prep_processes``)."""

    model_dir: str
    policy: MediaPolicy
    merge_size: int | None
    pixel_settings: PixelSettings | None = None
    tokenizer: TokenizerSnapshot | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tokenizer": None}

    def load(self) -> PrepTools:
        """Load the tokenizer and (for VL models) the image preprocessor of ``model_dir``.
        With a tokenizer snapshot and pixel settings (the server's defaults) this imports
        neither torch nor transformers' model or image-processing modules."""
        images = self.merge_size is not None
        needs_processor = images and self.pixel_settings is None
        if self.tokenizer is not None:
            tokenizer, image_processor = TextTokenizer(self.tokenizer), None
            if needs_processor:
                from engine.model_loader import load_image_processor

                image_processor = load_image_processor(self.model_dir)
        else:
            from engine.model_loader import load_processors

            tokenizer, image_processor = load_processors(self.model_dir, images=needs_processor)
        if images and self.pixel_settings is not None:
            preprocessor = ImagePreprocessor.from_settings(self.pixel_settings, self.merge_size)
        elif image_processor is not None:
            preprocessor = ImagePreprocessor(image_processor, self.merge_size)
        else:
            preprocessor = None
        return PrepTools(tokenizer, self.policy, preprocessor)
