"""The rater's page in a real browser (Debian's chromium through selenium and chromium-driver), against the study
server on loopback: open an invitation, wait for both images, the prompt shown as text, the synchronised 1:1 zoom,
answers by keyboard and by clicks, a reload mid-task, a second tab, the end; voting stays off while an image is
missing; a patch rated with the number keys."""
import shutil
import tempfile

import pytest

from human_eval import assign, design, store
from study_helpers import XSS_PROMPT, ThreadServer, make_runs, make_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (shutil.which("/usr/bin/chromedriver"))
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="chromium and chromium-driver are not installed (apt-get install chromium "
                                       "chromium-driver)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
         "--force-device-scale-factor=1"]


@pytest.fixture
def browser():
    """A headless chromium driven by selenium, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script, expected, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script) == expected)


def state(driver):
    return driver.execute_script("return [document.body.dataset.state, "
                                 "document.getElementById('progress').textContent]")


def keys(driver, *pressed):
    from selenium.webdriver.common.action_chains import ActionChains

    for key in pressed:
        ActionChains(driver).send_keys(key).perform()


def shown_task(conn, driver, rater):
    """The task the page shows: the rater's first unanswered one (checked against the page's image URLs)."""
    meta = store.read_meta(conn)
    task = store.next_task(conn, rater, meta)["task"]
    sources = driver.execute_script("return Array.from(document.querySelectorAll('#views img'))"
                                    ".map(function (i) { return i.getAttribute('src'); })")
    assert [s.split("?")[0] for s in sources] == task["images"]
    return task


def test_a_rater_answers_by_keys_and_clicks_zooms_reloads_opens_a_second_tab_and_finishes(tmp_path, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    study, [(rater, token)] = make_study(tmp_path, n=3, raters=1, size=(320, 240))
    conn = store.connect(study)
    with ThreadServer(study) as running:
        browser.get(f"{running.url}/?token={token}")
        wait_for(browser, "return document.body.dataset.state", "ready")
        assert state(browser) == ["ready", "1 / 3"]
        prompts = []

        def check_page():
            task = shown_task(conn, browser, rater)
            loaded = browser.execute_script("return Array.from(document.querySelectorAll('#views img')).map("
                                            "function (i) { return i.complete && i.naturalWidth > 0; })")
            assert loaded == [True, True]  # voting is on only once both images are in
            assert browser.find_element(By.ID, "prompt").text == task["prompt"]  # as text, whatever it holds
            assert browser.execute_script("return document.querySelectorAll('body img').length") == 2
            try:
                browser.switch_to.alert
                pytest.fail("the prompt ran as HTML")
            except NoAlertPresentException:
                pass
            prompts.append(task["prompt"])
            return task

        # 1. Keyboard: 1 / ← left, 2 / → right, for the highlighted question in turn.
        first = check_page()
        coming = store.next_task(conn, rater, store.read_meta(conn))["prefetch"]
        wait_for(browser, "return performance.getEntriesByType('resource').filter(function (e) { return "
                          f"{coming!r}.some(function (u) {{ return e.name.indexOf(u) >= 0; }}); }}).length", 2)
        keys(browser, "1", Keys.ARROW_RIGHT, "2")
        wait_for(browser, "return document.getElementById('progress').textContent", "2 / 3")
        wait_for(browser, "return document.body.dataset.state", "ready")
        assert {q: a for (t, q), a in answers(conn).items() if t == first["id"]} == {
            "aesthetics": "left", "prompt_adherence": "right", "fine_details": "right"}

        # 2. The zoom: a click shows both images at 1:1 around the same point; a second click goes back.
        second = check_page()
        views = browser.find_elements(By.CSS_SELECTOR, "#views .view")
        ActionChains(browser).move_to_element_with_offset(views[0], -60, 25).click().perform()
        zoom = browser.execute_script("""return Array.from(document.querySelectorAll('#views .view')).map(function (v) {
            var img = v.querySelector('img'), box = img.getBoundingClientRect(), view = v.getBoundingClientRect();
            return {zoomed: v.classList.contains('zoomed'), x: +v.dataset.x, y: +v.dataset.y, w: box.width,
                    h: box.height, natural: [img.naturalWidth, img.naturalHeight],
                    centre: [view.left + v.clientLeft + v.clientWidth / 2 - box.left,
                             view.top + v.clientTop + v.clientHeight / 2 - box.top]}; });""")
        for view in zoom:
            assert view["zoomed"] and [view["w"], view["h"]] == view["natural"] == [320, 240]  # 1:1 pixels
            assert abs(view["centre"][0] - view["x"]) <= 0.5 and abs(view["centre"][1] - view["y"]) <= 0.5
        assert (zoom[0]["x"], zoom[0]["y"]) == (zoom[1]["x"], zoom[1]["y"])  # the same point in both
        scale = min(views[0].size["width"] / 320, views[0].size["height"] / 240)  # the fitted view's scale
        assert abs(zoom[0]["x"] - (160 - 60 / scale)) <= 2 and abs(zoom[0]["y"] - (120 + 25 / scale)) <= 2
        views[1].click()
        assert browser.execute_script("return document.querySelectorAll('.view.zoomed').length") == 0

        # 3. Clicks, a reload before the last answer (nothing sent yet: the same task again), then clicks to the end.
        browser.find_element(By.CSS_SELECTOR, "button[data-q='aesthetics'][data-value='right']").click()
        browser.find_element(By.CSS_SELECTOR, "button[data-q='prompt_adherence'][data-value='left']").click()
        browser.refresh()
        wait_for(browser, "return document.body.dataset.state", "ready")
        assert state(browser) == ["ready", "2 / 3"] and shown_task(conn, browser, rater)["id"] == second["id"]
        for question, side in (("fine_details", "left"), ("aesthetics", "right"), ("prompt_adherence", "right")):
            browser.find_element(By.CSS_SELECTOR, f"button[data-q='{question}'][data-value='{side}']").click()
        wait_for(browser, "return document.getElementById('progress').textContent", "3 / 3")
        assert {q: a for (t, q), a in answers(conn).items() if t == second["id"]} == {
            "aesthetics": "right", "prompt_adherence": "right", "fine_details": "left"}

        # 4. A second tab resumes at the same place and answers; the first tab's stale answer does not overwrite it.
        wait_for(browser, "return document.body.dataset.state", "ready")
        third = check_page()
        first_tab = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get(f"{running.url}/?token={token}")
        wait_for(browser, "return document.body.dataset.state", "ready")
        assert state(browser) == ["ready", "3 / 3"] and shown_task(conn, browser, rater)["id"] == third["id"]
        keys(browser, "2", "2", "2")
        wait_for(browser, "return document.body.dataset.state", "done")
        browser.switch_to.window(first_tab)
        keys(browser, "1", "1", "1")
        wait_for(browser, "return document.body.dataset.state", "done")
        assert "All done" in browser.find_element(By.ID, "done").text
        assert browser.find_element(By.ID, "progress").text == "3 / 3"
    stored = answers(conn)
    assert len(stored) == 9 and {a for (t, _), a in stored.items() if t == third["id"]} == {"right"}
    assert XSS_PROMPT in prompts and set(prompts) == {i["prompt"] for i in store.items(conn)}


def answers(conn):
    return {(r["task"], r["question"]): r["answer"] for r in store.answer_rows(conn)}


def test_voting_stays_off_while_an_image_fails_to_load(tmp_path, browser):
    study, [(rater, token)] = make_study(tmp_path, n=2, raters=1)
    conn = store.connect(study)
    task = store.next_task(conn, rater, store.read_meta(conn))["task"]
    _, _, shown = store.task_sides(conn, task["id"])
    gone = study / conn.execute("SELECT path FROM images WHERE id = ?", (shown[1],)).fetchone()[0]
    gone.rename(gone.with_suffix(".moved"))  # the right-hand image can no longer be served
    with ThreadServer(study) as running:
        browser.get(f"{running.url}/?token={token}")
        wait_for(browser, "return document.body.dataset.state", "failed")
        assert browser.execute_script("return Array.from(document.querySelectorAll('#questions button'))"
                                      ".every(function (b) { return b.disabled; })")
        keys(browser, "1", "1", "1")
        browser.execute_script("document.querySelector('#questions button').click()")
        assert "did not load" in browser.execute_script("return document.getElementById('status').textContent")
    assert answers(conn) == {}


def test_a_patch_is_rated_with_the_number_keys_0_meaning_10(tmp_path, browser):
    folders = make_runs(tmp_path / "runs", n=1, size=(160, 128))
    design.create_patches(tmp_path / "s", folders[:1], ["a"], 64, 2, workers=1)
    conn = store.connect(tmp_path / "s")
    [(rater, token)] = assign.add_raters(conn, 1)
    with ThreadServer(tmp_path / "s") as running:
        browser.get(f"{running.url}/?token={token}")
        wait_for(browser, "return document.body.dataset.state", "ready")
        assert browser.execute_script("return document.querySelectorAll('#questions button').length") == 10
        assert browser.execute_script("return document.querySelectorAll('#views img').length") == 1
        keys(browser, "7")
        wait_for(browser, "return document.getElementById('progress').textContent", "2 / 2")
        wait_for(browser, "return document.body.dataset.state", "ready")
        keys(browser, "0")
        wait_for(browser, "return document.body.dataset.state", "done")
    ratings = sorted((r["task"], r["rating"]) for r in store.answer_rows(conn))
    assert [rating for _, rating in ratings] == [7, 10]
