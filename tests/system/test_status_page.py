"""The status page in a real headless Chromium (Playwright driving Debian's chromium).

One test on a real cluster (the block bar and an upload's path against what the source says);
the rest against ``FakePipeline``, which can show what the runtime does not produce yet
(boundary moves, slow and dead nodes, demo controls) and is set to each state by the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import BuiltModel
from tests.serving import serving
from tests.system.browser import CHROMIUM, chromium
from tests.system.conftest import cluster
from tests.web import LABELS, FakePipeline
from web.app import WebSettings, create_app

pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Chromium is not installed (apt install chromium)")

WAIT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors  # no script error on the page


def segments(page: Any) -> dict[str, tuple[int, int, str]]:
    """The block bar: node -> (start, end, classes), read from the page."""
    found = page.eval_on_selector_all(
        "#blockbar .seg", "segs => segs.map(s => [s.dataset.node, +s.dataset.start, "
                          "+s.dataset.end, s.className])")
    return {node: (start, end, classes) for node, start, end, classes in found}


def wait_text(page: Any, selector: str, text: str) -> None:
    page.wait_for_function(
        "([sel, text]) => { const e = document.querySelector(sel); "
        "return e !== null && e.textContent.includes(text); }", arg=[selector, text],
        timeout=WAIT_MS)


def photo(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def solid(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (40, 30), color).save(path)
    return path


# --- a real cluster ----------------------------------------------------------------------------


def test_real_cluster_block_bar_and_upload_path(built_tiny: BuiltModel, tmp_path: Path,
                                                page: Any) -> None:
    image = photo(tmp_path / "photo.png", 0)
    blocks = built_tiny.manifest.blocks
    # min_workers: both workers run blocks whatever this machine's timings say is optimal
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, min_workers=2) as source, \
            serving(create_app(source)) as url:
        expected = {n.name: (n.start, n.end) for n in source.status().nodes}
        answer = httpx.post(f"{url}/v1/classify", files={"file": image.read_bytes()},
                            timeout=30).json()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#blockbar .seg').length >= 3",
                               timeout=WAIT_MS)
        wait_text(page, "#model", f"{blocks} blocks")
        shown = segments(page)
        page.set_input_files("#file", str(image))
        page.wait_for_selector(".answer .pathbar .hop", timeout=WAIT_MS)
        card = page.query_selector(".answer")
        label = card.get_attribute("data-label")
        hops = page.eval_on_selector_all(
            ".answer .pathbar .hop", "hs => hs.map(h => [h.dataset.node, +h.dataset.start, "
                                     "+h.dataset.end])")
        thumb_width = page.eval_on_selector(".answer img.thumb", "img => img.naturalWidth")
        cut_ticks = page.eval_on_selector_all("#cuts .cut", "ts => ts.length")
        text = page.text_content(".answer") or ""
    assert expected["w1"][0] < expected["w1"][1] and expected["w2"][0] < expected["w2"][1]
    assert {name: (start, end) for name, (start, end, _) in shown.items()} == expected
    assert label == answer["top"][0]["label"]  # the label the API gives for this image
    assert [(n, s, e) for n, s, e in hops] == [
        (h["node"], h["blocks"][0], h["blocks"][1]) for h in answer["path"]]
    assert {"w1", "w2"} <= {node for node, _, _ in hops}
    assert thumb_width == 64  # the thumbnail is the uploaded image itself
    assert cut_ticks == blocks + 1
    assert "end to end" in text


# --- FakePipeline: what the runtime will produce ---------------------------------------------


def test_block_bar_follows_moves_and_node_states_without_a_reload(page: Any) -> None:
    fake = FakePipeline(events=[])
    fake.live = True
    with serving(create_app(fake)) as url:
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#blockbar .seg').length == 2",
                               timeout=WAIT_MS)
        assert {n: (s, e) for n, (s, e, _) in segments(page).items()} == {
            "source": (0, 2), "worker-1": (2, 4)}
        page.evaluate("window.notReloaded = true")
        _wait_for_stream(fake)

        # the exact optimum, marked over the bar
        fake.optimum = (0, 3, 4)
        page.wait_for_selector("#blockbar .opt-mark[data-boundary='3']", timeout=WAIT_MS)
        wait_text(page, "#optimum-note", "[0, 3, 4], bottleneck 2.5 ms")

        # a boundary move, because worker-1 slowed down
        fake.boundaries = (0, 3, 4)
        fake.set_node("source", end=3)
        fake.set_node("worker-1", start=3, state="slow", slowdown=4.0)
        fake.publish("boundary_moved", boundaries=[0, 3, 4], previous=[0, 2, 4],
                     route=["source", "worker-1"], node="worker-1", factor=4.0)
        wait_text(page, "#log", "worker-1 slowed to 4x: blocks [2, 4) → [3, 4); "
                                "source blocks [0, 2) → [0, 3)")
        page.wait_for_selector("#blockbar .seg.slow[data-node='worker-1']", timeout=WAIT_MS)
        page.wait_for_function("document.querySelector('#blockbar .seg[data-node=\"worker-1\"]')"
                               ".dataset.start === '3'", timeout=WAIT_MS)
        bar = segments(page)
        assert bar["source"][:2] == (0, 3) and bar["worker-1"][:2] == (3, 4)
        assert "slow" in bar["worker-1"][2].split()
        page.wait_for_selector(".node.slow[data-node='worker-1']", timeout=WAIT_MS)

        # a move as the adaptive runtime reports it: who moved, in words, the new boundaries;
        # the page takes the ranges from the snapshots before and after
        fake.publish("boundary_moved", node="worker-1", boundaries=[0, 1, 4],
                     detail="source | worker-1: boundary 3 -> 1, pair bottleneck 6.00 -> "
                            "4.00 ms (predicted source 2.00 ms, worker-1 4.00 ms)")
        fake.boundaries = (0, 1, 4)
        fake.set_node("source", end=1)
        fake.set_node("worker-1", start=1)
        wait_text(page, "#log", "worker-1 moved boundary 3 → 1: blocks [3, 4) → [1, 4); "
                                "source blocks [0, 3) → [0, 1) (pair bottleneck 6.00 → 4.00 ms)")
        page.wait_for_function("document.querySelector('#blockbar .seg[data-node=\"worker-1\"]')"
                               ".dataset.start === '1'", timeout=WAIT_MS)

        # a dead node
        fake.set_node("worker-1", state="down")
        fake.publish("node_down", node="worker-1", reason="no heartbeat for 3 s")
        wait_text(page, "#log", "worker-1 is down: no heartbeat for 3 s")
        page.wait_for_selector(".node.down[data-node='worker-1']", timeout=WAIT_MS)
        page.wait_for_selector("#blockbar .seg.down[data-node='worker-1']", timeout=WAIT_MS)
        assert page.evaluate("window.notReloaded") is True

        # the filters: only health events
        for kind in ("moves", "controls", "requests", "other"):
            page.uncheck(f"#filters input[value={kind}]")
        log = page.text_content("#log") or ""
        assert "is down" in log and "slowed to" not in log
        page.fill("#event-search", "heartbeat")
        assert page.eval_on_selector_all("#log li", "items => items.length") == 1


def _wait_for_stream(fake: FakePipeline) -> None:
    """Until the page's EventSource is connected (so a published event reaches it)."""
    import time

    deadline = time.monotonic() + WAIT_MS / 1000
    while fake.subscribers() == 0:
        assert time.monotonic() < deadline, "the page never opened the event stream"
        time.sleep(0.05)


def test_several_dropped_images_each_get_their_answer(page: Any, tmp_path: Path) -> None:
    fake = FakePipeline(events=[])
    files = [solid(tmp_path / "red.png", (200, 10, 10)),  # mean 73: class_3 in the fake
             solid(tmp_path / "grey.png", (60, 60, 60))]  # mean 60: class_0
    expected = {f.name: fake_label(f) for f in files}
    assert len(set(expected.values())) == 2
    with serving(create_app(fake)) as url:
        page.goto(url)
        page.wait_for_selector("#blockbar .seg", timeout=WAIT_MS)
        # drop both files on the drop zone, as a person drags them from a file manager
        transfer = page.evaluate_handle(
            """async (items) => {
                 const dt = new DataTransfer();
                 for (const [name, b64] of items) {
                   const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                   dt.items.add(new File([bytes], name, {type: "image/png"}));
                 }
                 return dt;
               }""", [[f.name, _b64(f)] for f in files])
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_function("document.querySelectorAll('.answer[data-label]').length == 2",
                               timeout=WAIT_MS)
        cards = page.eval_on_selector_all(
            ".answer", "cs => cs.map(c => [c.dataset.file, c.dataset.label, "
                       "c.querySelector('img.thumb').naturalWidth, "
                       "c.querySelectorAll('.top .score').length, c.textContent, "
                       "[...c.querySelectorAll('.pathbar .hop')].map(h => "
                       "[h.dataset.node, +h.dataset.start, +h.dataset.end])])")
    assert {name: label for name, label, *_ in cards} == expected
    for _name, _label, width, bars, text, hops in cards:
        assert width == 40 and bars == 5
        assert "4.0 ms end to end" in text
        assert hops == [["source", 0, 2], ["worker-1", 2, 4]]


def fake_label(path: Path) -> str:
    """FakePipeline.classify's top-1 label: mean pixel value modulo the class count."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return LABELS[int(pixels.mean()) % len(LABELS)]


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_with_a_token_the_page_asks_once_and_the_api_refuses_without(page: Any,
                                                                      tmp_path: Path) -> None:
    fake = FakePipeline(events=[])
    fake.live = True
    token = "correct horse battery staple"
    with serving(create_app(fake, settings=WebSettings(api_token=token))) as url:
        for path in ("v1/pipeline", "v1/events", "metrics", "v2/models/fake_net"):
            assert httpx.get(url + "/" + path).status_code == 401, path
        assert httpx.get(url + "/v2/health/ready").status_code == 200

        page.goto(url)
        page.wait_for_selector("#token-panel:not([hidden])", timeout=WAIT_MS)
        assert page.eval_on_selector_all("#blockbar .seg", "s => s.length") == 0
        page.fill("#token-input", "wrong")
        page.click("#token-submit")
        wait_text(page, "#token-error", "not accepted")
        page.fill("#token-input", token)
        page.click("#token-submit")
        page.wait_for_selector("#token-panel", state="hidden", timeout=WAIT_MS)
        page.wait_for_selector("#blockbar .seg", timeout=WAIT_MS)
        assert page.evaluate("sessionStorage.getItem('armdi-api-token')") == token
        assert "HttpOnly" not in (page.evaluate("document.cookie") or "")  # script can't read it
        assert page.evaluate("document.cookie") == ""

        _wait_for_stream(fake)  # the event stream got in with the session cookie
        fake.publish("node_up", node="worker-1")
        wait_text(page, "#log", "worker-1 is up again")

        # demo controls, which send the token as a header
        page.click(".node[data-node='worker-1'] button[data-action=slow]")
        wait_text(page, "#log", "worker-1 slowed to 4x (emulated)")
        page.click(".node[data-node='worker-1'] button[data-action=kill]")
        wait_text(page, "#log", "worker-1 killed")
        page.wait_for_selector(".node.down[data-node='worker-1']", timeout=WAIT_MS)
        assert fake.slowdowns == [("worker-1", 4.0)]
        assert fake.faults == [("worker-1", "kill", 3.0)]

        # an upload with the token
        page.set_input_files("#file", str(solid(tmp_path / "x.png", (10, 20, 30))))
        page.wait_for_selector(".answer[data-label]", timeout=WAIT_MS)

        # the page remembers the token for this tab: a reload does not ask again
        page.reload()
        page.wait_for_selector("#blockbar .seg", timeout=WAIT_MS)
        assert page.is_hidden("#token-panel")
