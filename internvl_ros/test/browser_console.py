"""internvl-console in a real browser: Debian's headless chromium driven by Playwright for Python
(``executable_path``; Playwright never downloads a browser here).

Run by ``make test-browser``, which installs chromium (apt) and Playwright
(requirements/console.txt) when missing. The file name does not match ``test_*.py`` on purpose:
``make test`` (``pytest internvl_ros/test``) does not collect it, and ``make test-browser``
names it explicitly.

Against a running node with the tiny model (one node process, a 640x480 camera at 30 Hz from
this process): the page loads; the frame appears and refreshes; a prompt streams an answer equal
to the Describe service's greedy answer for the same frame and prompt; cancel stops a long
answer; the history grows (action and continuous captions, with stamp and prompt); a prompt
containing HTML is shown literally. Offline mode: upload an image and get the pipeline's answer;
a bad file gets a message. Model output containing HTML is shown literally (scripted backend).

CONSOLE_SCREENSHOT=path saves the ROS-mode page after an answer (docs/images/console.png).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from test_console import ScriptedBackend, Served, png_bytes
from test_node import NS_RAW, PROMPT, RAW_TOPIC, Client, NodeProcess, scene, write_params

from internvl_ros.export.testing import tiny_model_dirs

from conftest import wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Deprecated in favor of:DeprecationWarning")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail("Debian's chromium is missing: `make test-browser` installs it "
                    "(apt-get install chromium, as root)")
    return path


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `make test-browser` installs requirements/console.txt")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"the page raised: {errors}"


class ConsoleProcess:
    """internvl-console --port 0 ... as a subprocess; ``url`` from its first line."""

    def __init__(self, *args: str):
        exe = shutil.which("internvl-console")
        cmd = [exe] if exe else [sys.executable, "-m", "internvl_ros.console"]
        self.proc = subprocess.Popen([*cmd, "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        self.lines: list[str] = []
        first = self.proc.stdout.readline()
        self.lines.append(first)
        m = re.search(r"serving (http://\S+)", first)
        assert m, f"the console did not start: {first}{self.proc.stdout.read()}"
        self.url = m.group(1)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---------------------------------------------------------------------------------------------
# ROS mode


@pytest.fixture(scope="module")
def ros(tmp_path_factory, ros_domain):
    """A node on the tiny model fed by a 30 Hz camera, and a console joined to it."""
    tmp = tmp_path_factory.mktemp("console")
    params = write_params(tmp / "p.yaml", model_dir=str(tiny_model_dirs("a")[1]),
                          max_new_tokens=16, max_queue=2, request_timeout=60.0,
                          caption_rate_hz=1.0)
    node = NodeProcess(tmp, "node", params, "-r", f"image:={RAW_TOPIC}")
    client = Client(ros_domain)
    console = None
    try:
        assert client.srv[NS_RAW].wait_for_service(timeout_sec=60), node.log()
        client.start_stream(scene(1))
        console = ConsoleProcess("--node", "/internvl")
        yield {"node": node, "client": client, "console": console}
    finally:
        if console is not None:
            assert console.stop() == 0, "".join(console.lines)
        client.close()
        node.stop()


def answer_texts(page) -> list[str]:
    return page.evaluate("window.__texts")


def watch_answer(page) -> None:
    """Record every text the answer element is given (to see it stream). Each mutation record
    keeps the text node it added, so texts set within one task (a fast model's deltas read from
    the stream at once) are all seen."""
    page.evaluate("""() => {
        window.__texts = [];
        const a = document.querySelector('[data-testid=answer]');
        new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes) window.__texts.push(n.data);
        }).observe(a, {childList: true});
    }""")


def ask(page, prompt: str, max_tokens: int | None = None, wait: bool = True) -> None:
    page.get_by_test_id("prompt").fill(prompt)
    page.get_by_test_id("max-tokens").fill(str(max_tokens) if max_tokens else "")
    page.get_by_test_id("send").click()
    if wait:
        page.wait_for_selector("[data-testid=answer][data-state=done]")


def q(testid: str) -> str:
    """The JS expression of the element with this data-testid."""
    return f"document.querySelector('[data-testid={testid}]')"


def wait_js(page, expr: str, timeout: float = TIMEOUT_MS) -> None:
    """Wait until the JS expression is true (as a function: the page's CSP forbids eval)."""
    page.wait_for_function(f"() => ({expr})", timeout=timeout)


def open_console(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def test_page_loads_and_the_live_frame_appears(page, ros):
    open_console(page, ros["console"].url)
    for tid in ("frame", "prompt", "send", "cancel", "answer", "ttft", "history", "status"):
        assert page.get_by_test_id(tid).count() == 1, tid
    wait_js(  # discovered from the graph
        page, f"document.querySelector('[data-testid=source]').value === {RAW_TOPIC!r}")
    wait_js(page, f"{q('frame')}.naturalWidth === 640")
    assert RAW_TOPIC in page.get_by_test_id("frame-info").text_content()
    assert "640x480" in page.get_by_test_id("frame-info").text_content()
    # refreshed a few times a second
    seen = set()
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        seen.add(page.get_by_test_id("frame").get_attribute("src"))
        time.sleep(0.05)
    assert len(seen) >= 3, f"{len(seen)} frames in 2 s"
    # the status panel shows the node's diagnostics
    wait_js(page, f"{q('status')}.textContent.includes('frames_received')")
    assert page.get_by_test_id("status-level").text_content() in ("OK", "WARN")


def test_streamed_answer_equals_the_service_answer(page, ros):
    client = ros["client"]
    ref = client.describe(NS_RAW, prompt=PROMPT, max_new_tokens=400)
    assert ref.success, ref.message
    open_console(page, ros["console"].url)
    watch_answer(page)
    ask(page, PROMPT, max_tokens=400)  # the node sends feedback at most 50 times a second
    final = page.get_by_test_id("answer").text_content()
    assert final == ref.caption
    shown = [t for t in answer_texts(page) if t]
    partial = [t for t in shown if t != final]
    assert partial, f"the answer did not stream: {shown}"
    assert all(final.startswith(t) for t in shown)
    assert page.get_by_test_id("finish").text_content() == ref.finish_reason
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", page.get_by_test_id("ttft").text_content())
    assert float(page.get_by_test_id("tps").text_content()) > 0
    assert page.get_by_test_id("message").text_content() == ""
    if os.environ.get("CONSOLE_SCREENSHOT"):
        page.wait_for_timeout(1500)  # let the history and status catch up
        page.screenshot(path=os.environ["CONSOLE_SCREENSHOT"])


def test_history_grows_with_action_and_continuous_captions(page, ros):
    open_console(page, ros["console"].url)
    items = page.locator("[data-testid=history] li")
    # continuous mode (caption_rate_hz 1) fills it
    wait_js(page, "document.querySelectorAll('[data-testid=history] li').length > 0")
    wait_for(lambda: "continuous" in page.get_by_test_id("history").text_content(), 20,
             "a continuous caption")
    n = items.count()
    prompt = "Is the path clear?"
    ask(page, prompt)
    answer = page.get_by_test_id("answer").text_content()
    wait_js(page, f"document.querySelectorAll('[data-testid=history] li').length > {n}")
    mine = page.locator("[data-testid=history] li", has_text=prompt).first
    mine.wait_for()
    assert mine.locator(".prompt").text_content() == prompt
    assert mine.locator(".text").text_content() == answer
    head = mine.locator("div").first.text_content()
    client = ros["client"]
    wait_for(lambda: any(c.prompt == prompt for c in client.stamped[NS_RAW]), 10, "the caption")
    st = next(c for c in client.stamped[NS_RAW] if c.prompt == prompt)
    stamp = st.header.stamp.sec + st.header.stamp.nanosec * 1e-9  # the test camera's: 1000 + i
    assert head.startswith("action") and f"{stamp:.3f} s" in head, head  # source, stamp


def _click_cancel(page) -> None:
    """Click cancel if the answer is still running; an answer that ended first (the button is
    disabled again) is a lost race, which the caller sees in the finish reason."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.get_by_test_id("cancel").click(timeout=3000)
    except PlaywrightTimeoutError:
        pass


def _ask_and_cancel(page, streaming: bool) -> None:
    """Ask a long question and cancel it (once its text streams, or at once), up to 5 times
    until the finish reason is `cancelled`; fails if it never is."""
    finishes = []
    for _ in range(5):
        ask(page, PROMPT, max_tokens=1500, wait=False)
        if streaming:
            wait_js(page, f"{q('answer')}.textContent.length > 0")
        _click_cancel(page)
        page.wait_for_selector("[data-testid=answer][data-state=done]")
        finishes.append(page.get_by_test_id("finish").text_content())
        if finishes[-1] == "cancelled":
            return
    raise AssertionError(f"never cancelled in time: {finishes}")


def test_cancel_stops_a_long_answer(page, ros):
    """Cancel while the answer streams. The tiny model writes 1500 tokens in about a second
    here, so a click can lose the race on a loaded machine: then (finish eos/length/context)
    try again; a cancel that never works fails."""
    open_console(page, ros["console"].url)
    _ask_and_cancel(page, streaming=True)
    assert 1 <= int(page.get_by_test_id("tokens").text_content()) < 1500
    assert page.get_by_test_id("answer").text_content()  # the partial text stays
    assert page.get_by_test_id("send").is_enabled()
    # cancel before the question even started streaming (retried the same way)
    _ask_and_cancel(page, streaming=False)
    # the node is free again
    ask(page, PROMPT)
    assert page.get_by_test_id("finish").text_content() in ("eos", "length")


def test_a_prompt_with_html_is_shown_literally(page, ros):
    open_console(page, ros["console"].url)
    prompt = '<img src=x onerror="window.__pwned=1"><b id="bold">bold</b><script>x()</script>'
    ask(page, prompt)
    assert page.get_by_test_id("asked").text_content() == f"Q: {prompt}"
    mine = page.locator("[data-testid=history] li", has_text='<b id="bold">').first
    mine.wait_for()
    assert mine.locator(".prompt").text_content() == prompt
    assert page.locator("#bold").count() == 0
    assert page.locator("[data-testid=history] img, [data-testid=asked] img").count() == 0
    assert page.evaluate("window.__pwned") is None


# ---------------------------------------------------------------------------------------------
# offline mode, and model output containing HTML


@pytest.fixture(scope="module")
def offline():
    console = ConsoleProcess("--model-dir", str(tiny_model_dirs("a")[1]),
                             "--max-new-tokens", "20", "--max-upload-mb", "1")
    yield console
    assert console.stop() == 0, "".join(console.lines)


def test_offline_upload_then_answer(page, offline):
    from internvl_ros.core import GenerationConfig, Pipeline

    rgb = scene(3)[::2, ::2].copy()  # 320x240
    open_console(page, offline.url)
    wait_js(page, "document.querySelector('[data-testid=frame]').naturalWidth === 640")
    page.get_by_test_id("upload").set_input_files(
        files=[{"name": "scene.png", "mimeType": "image/png", "buffer": png_bytes(rgb)}])
    wait_js(page, "document.querySelector('[data-testid=source]').value === 'upload-1'")
    wait_js(page, "document.querySelector('[data-testid=frame]').naturalWidth === 320")
    prompt = "What is on the floor?"
    watch_answer(page)
    ask(page, prompt, max_tokens=300)  # long enough to arrive in several pieces
    with Pipeline.from_model_dir(tiny_model_dirs("a")[1]) as pipe:
        ref = pipe.generate(prompt, images=[rgb],
                            config=GenerationConfig(max_new_tokens=300)).result
    assert page.get_by_test_id("answer").text_content() == ref.text
    shown = [t for t in answer_texts(page) if t]
    assert len(shown) > 100 and all(ref.text.startswith(t) for t in shown)  # token by token
    assert page.get_by_test_id("finish").text_content() == ref.finish_reason
    # a bad file and a too-large one get a clear message (checked in the page, and by the
    # server: test_console), and the image stays
    for data, why in ((b"this is not an image", "neither JPEG nor PNG"),
                      (b"\x89PNG" + bytes(1_200_000), "at most 1.0 MB")):
        page.get_by_test_id("upload").set_input_files(
            files=[{"name": "bad.png", "mimeType": "image/png", "buffer": data}])
        wait_js(page, f"{q('upload-message')}.textContent.includes({why!r})")
    assert page.get_by_test_id("source").input_value() == "upload-1"


def test_model_output_with_html_is_shown_literally(page):
    backend = ScriptedBackend()
    served = Served(backend)
    try:
        open_console(page, f"http://127.0.0.1:{served.port}/")
        ask(page, "anything")
        assert page.get_by_test_id("answer").text_content() == backend.answer
        assert page.locator("[data-testid=answer] b, [data-testid=answer] script").count() == 0
        mine = page.locator("[data-testid=history] li .text", has_text="<script>").first
        mine.wait_for()
        assert mine.text_content() == backend.answer
        assert page.evaluate("window.pwned") is None
    finally:
        served.close()
