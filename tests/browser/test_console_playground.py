"""The playground in Chromium against a real agent with echo backends (issue 17 items 2 and 6): a chat answer
streamed through the gateway's own path, the node and replica that answered, first-token and total times;
embeddings with the vector size and a cosine; by keyboard; at 375 and 1,920 px."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from nodes.apikeys import api_key_create
from nodes.models import ModelReplica
from tests.browser.conftest import screenshot
from tests.conftest import wait_until
from tests.e2e.gateway_support import in_flight, start_agents_fixture, wait_in_flight_zero  # noqa: F401
from tests.factories import ModelConfigFactory

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def _time() -> re.Pattern:
    return re.compile(r"^\d+(\.\d+)? (ms|s)$")


def test_chat_streams_through_the_gateway_and_names_node_and_replica(page, start_agents) -> None:
    (agent,) = start_agents(1)
    ModelConfigFactory(name="echo-chat")
    ModelConfigFactory(name="echo-other")
    api_key_create(name="closes-v1")  # /v1 now needs a key; the page's staff door does not
    page.goto("/ui/playground/")
    expect(page.get_by_label("Model")).to_have_value("echo-chat")
    page.get_by_label("Message").focus()
    page.keyboard.type("hello streaming world")
    page.keyboard.press("Control+Enter")

    answer = page.locator('#pg-transcript [data-role="assistant"]').last
    expect(answer).to_contain_text("echo: hello streaming world", timeout=60_000)
    expect(page.locator('[data-served="node"]')).to_have_text(agent.name)
    expect(page.locator('[data-served="replica"]')).to_have_text("echo-chat#0")
    expect(page.locator('[data-served="ttft"]')).to_have_text(_time())
    expect(page.locator('[data-served="total"]')).to_have_text(_time())
    replica = ModelReplica.objects.get(model_name="echo-chat")
    assert replica.node.name == agent.name and replica.replica_index == 0
    wait_in_flight_zero("echo-chat")

    # A second turn carries the conversation; the Send button works by keyboard too.
    page.get_by_label("Message").fill("again")
    page.get_by_role("button", name="Send").focus()
    page.keyboard.press("Enter")
    expect(page.locator('#pg-transcript [data-role="assistant"]')).to_have_count(2)
    expect(page.locator('#pg-transcript [data-role="assistant"]').last).to_contain_text("echo: again")
    screenshot(page, "playground-chat-1920", full_page=True)
    wait_in_flight_zero("echo-chat")

    # Embeddings: two inputs, the vector's size and their cosine.
    page.get_by_text("Embeddings", exact=True).click()
    page.get_by_label("First text").fill("alpha")
    page.get_by_label("Second text").fill("alpha")
    page.get_by_role("button", name="Embed both").click()
    expect(page.locator('[data-embed="size"]')).to_have_text("16", timeout=60_000)
    expect(page.locator('[data-embed="cosine"]')).to_have_text("1.0000")
    page.get_by_label("Second text").fill("something else entirely")
    page.get_by_role("button", name="Embed both").click()
    expect(page.locator('[data-embed="cosine"]')).not_to_have_text("1.0000")
    expect(page.locator('[data-served="replica"]')).to_have_text("echo-chat#0")


def test_a_gateway_error_is_shown_at_the_composer(page, cp_server) -> None:
    ModelConfigFactory(name="nowhere")  # no node at all: no capacity
    page.goto("/ui/playground/")
    page.get_by_label("Message").fill("anyone?")
    page.get_by_role("button", name="Send").click()
    error = page.locator("#pg-chat-error")
    expect(error).to_be_visible(timeout=60_000)
    expect(error).not_to_be_empty()
    expect(page.locator('#pg-transcript [data-role="assistant"]')).to_have_class(
        "bubble bubble-assistant bubble-failed"
    )


@pytest.mark.parametrize("width, height", [(375, 812), (1920, 1080)])
def test_the_page_fits_narrow_and_wide_screens(page, width, height) -> None:
    ModelConfigFactory(name="echo-chat")
    page.set_viewport_size({"width": width, "height": height})
    page.goto("/ui/playground/")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for name in ("Send", "Stop", "Clear"):
        box = page.get_by_role("button", name=name).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, name
    screenshot(page, f"playground-{width}", full_page=True)


def test_stop_mid_stream_gives_the_replica_back(page, start_agents) -> None:
    """Words arrive one by one (the answer grows on the page), and Stop ends the request: the page's door runs
    under Django's full handler, whose disconnect handling must release the in-flight unit too."""
    start_agents(1)
    ModelConfigFactory(name="echo-slow", options={"options": ["delay_ms:400"]})
    page.goto("/ui/playground/")
    words = " ".join(f"w{index}" for index in range(40))
    page.get_by_label("Message").fill(words)
    page.get_by_role("button", name="Send").click()
    answer = page.locator('#pg-transcript [data-role="assistant"] .bubble-text').last
    expect(answer).to_contain_text("echo: w0 w1", timeout=60_000)  # part of the answer, streamed
    expect(page.locator('[data-served="ttft"]')).to_have_text(_time())
    assert "w39" not in answer.inner_text()
    wait_until(lambda: in_flight("echo-slow") == [1], message="the stream's in-flight unit")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator('#pg-transcript [data-role="assistant"]').last).to_have_class(
        re.compile("bubble-failed")
    )
    expect(page.locator("#pg-chat-error")).to_be_hidden()  # stopping is not an error
    wait_in_flight_zero("echo-slow")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
