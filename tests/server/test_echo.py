"""Legacy completions ``echo`` (vLLM serves it; OpenAI too, for older models)."""

from __future__ import annotations


async def test_completions_echo_prepends_the_prompt(vlserve_client, fake_runtime):
    """``echo``: each choice's text starts with its own prompt, whole and streamed."""
    whole = await vlserve_client.completions.create(model="fake-model", prompt=["Hi", "Yo"], echo=True)
    assert [c.text for c in whole.choices] == ["HiHello, world!", "YoHello, world!"]
    stream = await vlserve_client.completions.create(model="fake-model", prompt="Hi", echo=True, stream=True)
    async with stream:
        texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert texts[0] == "Hi" and "".join(texts) == "HiHello, world!"
