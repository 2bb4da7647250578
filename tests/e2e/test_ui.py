"""`loomrun ui`, for real: the server with a real job and broker, tampered requests, and
the page in Debian's chromium driven by selenium, as a user would use it."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import pytest
from conftest import SCRIPTS, run_loomrun, wait_for
from jobs import job_id, start, wait_ready
from pages import ARTIFACTS, chromium_session, read_lines, start_ui

from loomrun.ui.server import cookie_name


@pytest.fixture
def browser():
    with chromium_session() as session:
        yield session


def call(base: str, path: str, body=None, token=None, headers=None, raw: bytes | None = None):
    """One HTTP request; (status, JSON answer)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(base + path, data=data, headers=headers or {})
    if token:
        request.add_header("Cookie", f"{cookie_name(token)}={token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_tampered_requests_get_one_line_and_change_nothing(procs):
    job = job_id("uibad")
    start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--quiet", job=job)
    wait_ready(job)
    _, base, token = start_ui(procs)
    good = {"job": job, "params": {"lr": "0.05"}}
    cases = [
        (call(base, "/api/set", good), 403, "no token"),
        (call(base, "/api/set", good, token="wrong" + token), 403, "no token"),
        (call(base, "/?token=nope"), 403, "wrong token"),
        (call(base, "/api/set", {**good, "job": "nosuchjob"}, token), 404, "no job 'nosuchjob'"),
        (call(base, "/api/set", {**good, "params": {"lr": "fast"}}, token), 400, "lr"),
        (call(base, "/api/set", {**good, "params": {"lr": "-1"}}, token), 400, "lr"),
        (call(base, "/api/set", {**good, "params": {"nope": "1"}}, token), 400, "no parameter"),
        (call(base, "/api/set", {**good, "replicas": ["r7"]}, token), 400, "r7"),
        (call(base, "/api/set", {**good, "params": {"x y": 1}}, token), 400, "parameter name"),
        (call(base, "/api/set", [1, 2], token), 400, "JSON object"),
        (call(base, "/api/set", token=token, raw=b"{not json"), 400, "not JSON"),
        (call(base, "/api/set", token=token, raw=b"{" + b" " * 100_000 + b"}"), 413, "larger"),
        (call(base, "/api/pause", {"job": job, "paused": "yes"}, token), 400, "true or false"),
        (
            call(base, "/api/set", good, token, headers={"Origin": "http://evil.example"}),
            403, "another site",
        ),
        (call(base, "/static/vendor%2F..%2F..%2Fserver.py", token=token), 404, "no file"),
        (call(base, "/", token=token, headers={"Host": "evil.example"}), 403, "127.0.0.1"),
        (call(base, "/api/set", {**good, "force": "false"}, token), 400, "force"),
        (call(base, "/api/set", token=token, raw=b"[" * 50_000), 413, "larger"),
        (call(base, "/api/set", token=token, raw=b"[" * 15_000), 400, "not JSON"),
    ]  # fmt: skip
    for (status, answer), want_status, want_text in cases:
        assert status == want_status, (status, answer)
        assert isinstance(answer, dict) and want_text in answer["error"], answer
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    listed = json.loads(run_loomrun("get", "--job", job, "--json").stdout)["params"]
    assert {p["name"]: p["value"] for p in listed}["lr"] == 0.1, "nothing changed"
    asyncio.run(websocket_gate(base, token))
    tunnel = {"Host": "localhost:9999", "Origin": "http://localhost:9999"}  # ssh -L 9999:...
    status, answer = call(base, "/api/set", {**good, "params": {"lr": "0.04"}}, token, tunnel)
    assert status == 200 and answer["result"] == "applied", answer
    status, answer = call(base, "/api/set", good, token)
    assert status == 200 and answer["result"] == "applied", answer
    (change,) = answer["changes"]
    assert change["replica"] == "r0" and change["old"] == 0.04 and change["new"] == 0.05


async def websocket_gate(base: str, token: str) -> None:
    """The live stream lets in only the token's holder, from the page's own origin; what
    it is sent that is not a choice of a job is left out, and it goes on."""
    import aiohttp

    cookie = {cookie_name(token): token}
    async with aiohttp.ClientSession() as anyone:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await anyone.ws_connect(base + "/ws")
        assert refused.value.status == 403
    async with aiohttp.ClientSession(cookies=cookie) as holder:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await holder.ws_connect(base + "/ws", headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        async with holder.ws_connect(base + "/ws", headers={"Origin": base}) as live:
            for junk in ("[]", "1", "{", "[" * 2000, '{"type": "select", "job": "*"}'):
                await live.send_str(junk)
            frame = json.loads((await live.receive(timeout=10)).data)
            assert frame["type"] == "frame"
            frame = json.loads((await live.receive(timeout=10)).data)  # still going
            assert frame["type"] == "frame"


def used_lrs(lines: list[str], replica: str) -> list[tuple[int, float]]:
    """(step, lr) of each optimizer step the replica printed (tests/scripts/steered.py)."""
    out = []
    for line in list(lines):
        if found := re.match(rf"\[{replica}\] used (\d+) (\S+) batch", line):
            out.append((int(found[1]), float(found[2])))
    return out


@pytest.mark.slow
def test_the_page_shows_and_steers_a_real_job(procs, browser):
    from selenium.webdriver.common.by import By

    job = job_id("uipage")
    sup = start(procs, SCRIPTS / "steered.py", "--steps", "10000000", "--step-time", "0.02",
                job=job, replicas=2)  # fmt: skip
    output = read_lines(sup)
    wait_ready(job, ("r0", "r1"))
    url, _, _ = start_ui(procs, "--job", job)
    browser.get(url)
    state = lambda expression: browser.execute_script(f"return {expression}")  # noqa: E731

    wait_for(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#replicas tr[data-replica]")) == 2,
        30, what="both replicas in the table",
    )  # fmt: skip
    wait_for(
        lambda: state("['loss', 'lr'].every((m) => window.loomrun.charts[m] && "
                      "window.loomrun.charts[m].plot.series.length === 3 && "
                      "window.loomrun.charts[m].plot.data[0].length > 3)"),
        30, what="a loss and an lr curve, each with a line per replica",
    )  # fmt: skip

    # lr for r1 alone, from the page.
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#params [data-param=lr] input"), 30,
             what="the lr form")  # fmt: skip
    browser.find_element(By.ID, "target-all").click()
    browser.find_element(By.CSS_SELECTOR, "input.target[data-replica=r1]").click()
    field = browser.find_element(By.CSS_SELECTOR, "#params [data-param=lr] input")
    field.clear()
    field.send_keys("0.0421")
    browser.find_element(By.CSS_SELECTOR, "#params [data-param=lr] button").click()
    answer = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#outcome .applied[data-replica=r1]"), 30,
        what="r1's answer on the page",
    )[0].text  # fmt: skip
    step = int(re.search(r"lr 0\.1 -> 0\.0421 at step (\d+)", answer)[1])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#outcome [data-replica=r0]")) == 0
    wait_for(lambda: any(s >= step and lr == 0.0421 for s, lr in used_lrs(output, "r1")), 30,
             what="r1's optimizer stepping with lr 0.0421")  # fmt: skip
    assert all(lr == 0.1 for _, lr in used_lrs(output, "r0")), "r0 was not changed"

    # Pause both from the page, then resume.
    browser.find_element(By.ID, "target-all").click()
    browser.find_element(By.ID, "pause").click()
    wait_for(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#outcome .applied")) == 2, 30,
        what="both replicas paused",
    )  # fmt: skip

    def states() -> set[str]:
        snapshot = json.loads(run_loomrun("watch", "--once", "--json", "--job", job).stdout)
        return {r["state"] for r in snapshot["jobs"][0]["replicas"]}

    wait_for(lambda: states() == {"paused"}, 10, interval=0.2, what="both shown paused")
    browser.find_element(By.ID, "resume").click()
    wait_for(
        lambda: "resumed" in browser.find_element(By.ID, "outcome").text, 30, what="resumed"
    )  # fmt: skip

    # A change made with the CLI appears on the page as a marker on the curves.
    assert run_loomrun("set", "lr=0.0333", "--replica", "r0", "--job", job).returncode == 0
    asked = time.monotonic()
    wait_for(lambda: state("window.loomrun.markers.some((m) => m.new === 0.0333)"), 10,
             interval=0.02, what="the CLI's change as a marker")  # fmt: skip
    print(f"the CLI's change was a marker on the page {time.monotonic() - asked:.2f} s after "
          "`loomrun set` returned")  # fmt: skip
    assert state("window.loomrun.markers.filter((m) => m.name === 'lr').length") == 2
    row = browser.find_element(By.CSS_SELECTOR, "#changes tbody tr").text
    assert "r0" in row and "0.0333" in row and "applied" in row
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    drawn = state("window.loomrun.chartDraws")
    wait_for(lambda: state("window.loomrun.chartDraws") > drawn, 10, what="the curves redrawn")
    assert browser.save_screenshot(str(ARTIFACTS / "ui.png"))

    # The page's connection drops (a laptop's network, a restarted tunnel): it says so,
    # comes back by itself, and steers again.
    browser.execute_script("window.dropped = socket; socket.close()")
    wait_for(lambda: state("socket !== window.dropped && socket.readyState === 1"), 10,
             what="a new connection")  # fmt: skip
    assert browser.find_element(By.ID, "link").text == "live"
    frames = state("window.loomrun.frames")
    wait_for(lambda: state("window.loomrun.frames") > frames, 10, what="frames again")
    lr_input = "#params [data-param=lr] input"
    field = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, lr_input), 10,
                     what="the lr form back")[0]  # fmt: skip
    field.clear()
    field.send_keys("0.0555")
    browser.find_element(By.CSS_SELECTOR, "#params [data-param=lr] button").click()
    wait_for(lambda: any(lr == 0.0555 for _, lr in used_lrs(output, "r1")), 30,
             what="r1 stepping with the change made after the reconnect")  # fmt: skip


def test_the_page_has_a_form_per_field_of_a_structured_parameter(procs, browser):
    """Built from the parameter's JSON Schema: the whole value as JSON, and each field by
    its path, with its bounds; a field set from the page changes that field alone."""
    from selenium.webdriver.common.by import By

    job = job_id("uifields")
    start(procs, SCRIPTS / "structured.py", job=job)
    wait_ready(job, name="sched")
    url, _, _ = start_ui(procs, "--job", job)
    browser.get(url)
    steps = '#params [data-param="sched/warmup/steps"]'
    field = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f"{steps} input"), 30,
                     what="the form of sched/warmup/steps")[0]  # fmt: skip
    assert field.get_attribute("type") == "number" and field.get_attribute("min") == "0"
    assert field.get_attribute("value") == "100"
    whole = browser.find_element(By.CSS_SELECTOR, '#params [data-param="aug"] input')
    assert json.loads(whole.get_attribute("value")) == {"p": 0.5, "x.y": 1.0}
    assert browser.find_elements(By.CSS_SELECTOR, '#params [data-param="aug/x.y"] input')
    assert browser.find_elements(By.CSS_SELECTOR, '#params [data-param="blocks/1/width"] input')
    field.clear()
    field.send_keys("250")
    browser.find_element(By.CSS_SELECTOR, f"{steps} button").click()
    answer = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#outcome .applied[data-replica=r0]"), 30,
        what="r0's answer on the page",
    )[0].text  # fmt: skip
    assert re.search(r"sched/warmup/steps 100 -> 250 at step \d+", answer), answer
    got = json.loads(run_loomrun("get", "--job", job, "--json").stdout)
    sched = next(p["value"] for p in got["params"] if p["name"] == "sched")
    assert sched == {"warmup": {"steps": 250, "start": 0.1}, "peak": 1.0, "name": "linear"}
