"""study.py judge against a fake OpenAI-compatible server on loopback: Table 11's prompt verbatim, both orders with the
sides undone, images in order, retries on timeouts / 429 / 500, refusals and malformed answers stored as errors with
their raw text and never as votes, and a rerun that asks only what is still missing."""
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import study
from errors import UsageError
from human_eval import judge, store
from study_helpers import make_study

# Table 11 of the paper, as the issue quotes it: the text sent must be this, word for word.
TABLE_11_SYSTEM = ("As an AI visual assistant, you are analyzing two specific images. When presented with a specific "
                   "caption, it is required to evaluate visual aesthetics, prompt coherence and fine details.")
TABLE_11_USER = (
    "The caption for the two images is: (prompt). Please answer the following questions: 1. Visual Aesthetics: Given "
    "the prompt, which image is of higher-quality and aesthetically more pleasing? 2. Prompt Adherence: Which image "
    "looks more representative to the text shown above and faithfully follows it? 3. Fine Details: Which image more "
    "accurately represents the fine visual details? Focus on clarity, sharpness, and texture. Assess the fidelity of "
    "fine elements such as edges, patterns, and nuances in color. The more precise representation of these details is "
    "preferred! Ignore other aspects. Please respond me strictly in the following format: 1. Visual Aesthetics: (the "
    "first image is better) or (the second image is better). The reason is (give your reason here). 3. Fine Details: "
    "(the first image is better) or (the second image is better). The reason is (give your reason here). 3. Fine "
    "Details: (the first image is better) or (the second image is better). The reason is (give your reason here).")
NAMES = ("Visual Aesthetics", "Prompt Adherence", "Fine Details")


#################################################################################
#                          A fake OpenAI-compatible server                      #
#################################################################################

def completion(content, refusal=None):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}]}


def answer_text(first_better, names=NAMES, reason="the details differ"):
    return " ".join(f"{n}. {name}: The {'first' if first_better else 'second'} image is better. The reason is {reason}."
                    for n, name in zip((1, 2, 3), names))


def sent_images(request):
    """The images of a request's user message, decoded, in the order sent."""
    parts = request["messages"][1]["content"][1:]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))))
            for p in parts]


def sharpness(rgb):
    grey = rgb.astype(float).mean(2)
    return np.var(grey[1:-1, 2:] + grey[1:-1, :-2] + grey[2:, 1:-1] + grey[:-2, 1:-1] - 4 * grey[1:-1, 1:-1])


class FakeJudge:
    """POST /v1/chat/completions answered by behave(request, n) -> (status, body (dict or bytes), delay, headers)."""

    def __init__(self, behave):
        self.behave, self.requests, self.lock = behave, [], threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(request)
                    n = len(fake.requests)
                status, body, delay, headers = fake.behave(request, n)
                time.sleep(delay)
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def sharp_judge(request, n):
    """Says the sharper image is better on every question (what a careful judge does with a against blurred b)."""
    first, second = sent_images(request)[:2]
    return 200, completion(answer_text(sharpness(first) > sharpness(second))), 0, {}


def first_judge(request, n):
    """Always says the first image is better: pure position bias."""
    return 200, completion(answer_text(True)), 0, {}


def run_judge(study_dir, url, *flags, model="fake-vlm"):
    args = study.parse_args(["judge", str(study_dir), "--base_url", url, "--model", model, "--timeout", "2",
                             *flags])
    return study.main(args)


@pytest.fixture
def pairwise(tmp_path):
    study_dir, _ = make_study(tmp_path, n=4, raters=0, gold=0.25)  # 4 pairs and 1 gold pair
    return study_dir


def judge_rows(study_dir, model="fake-vlm"):
    return [r for r in store.answer_rows(store.connect(study_dir)) if r["rater"] == store.JUDGE_PREFIX + model]


#################################################################################
#                                  The prompt                                   #
#################################################################################

def test_the_published_prompt_is_table_11_verbatim_and_the_default_numbers_its_items_1_2_3():
    caption = "a red fox in the snow"
    assert judge.SYSTEM_PROMPT == TABLE_11_SYSTEM
    assert judge.user_prompt(caption, "published") == TABLE_11_USER.replace("(prompt)", caption)
    fixed = judge.user_prompt(caption, "fixed")
    assert fixed == TABLE_11_USER.replace("(prompt)", caption).replace(
        "3. Fine Details: (the first image is better) or (the second image is better). The reason is (give your reason "
        "here). 3. Fine", "2. Prompt Adherence: (the first image is better) or (the second image is better). The "
        "reason is (give your reason here). 3. Fine")
    format_line = fixed.split("following format: ")[1]
    assert [format_line.find(f"{n}. {name}:") >= 0 for n, name in zip((1, 2, 3), NAMES)] == [True] * 3


@pytest.mark.parametrize("text, expected", [
    (answer_text(True), {"aesthetics": "left", "prompt_adherence": "left", "fine_details": "left"}),
    ("**1. Visual Aesthetics:** (The second image is better). The reason is that the first image is better lit "
     "but blurred.\n**2. Prompt Adherence:** The first image is better. The reason is colour.\n"
     "**3. Fine Details:** the SECOND image is better. The reason is texture.",
     {"aesthetics": "right", "prompt_adherence": "left", "fine_details": "right"}),
    # the published format's numbering (3 for the second item), answered as asked: read by position
    (answer_text(False, names=("Visual Aesthetics", "Fine Details", "Fine Details")).replace("2. Fine", "3. Fine"),
     {"aesthetics": "right", "prompt_adherence": "right", "fine_details": "right"}),
], ids=["plain", "markdown-with-a-misleading-reason", "published-numbering"])
def test_verdicts_are_read_from_each_numbered_answer_before_its_reason(text, expected):
    assert judge.parse_verdicts(text, list(expected)) == (expected, None)


@pytest.mark.parametrize("text, problem", [
    ("I'm sorry, but I can't help with comparing these images.", "no verdict"),
    (judge.FORMATS["fixed"], "both images named better"),  # the template echoed back
    ("1. Visual Aesthetics: The first image is better. 3. Fine Details: The second image is better.", "no verdict"),
])
def test_a_missing_or_contradictory_answer_is_a_problem_and_never_a_verdict(text, problem):
    verdicts, found = judge.parse_verdicts(text, ["aesthetics", "prompt_adherence", "fine_details"])
    assert found is not None and problem in found
    assert "prompt_adherence" not in verdicts


#################################################################################
#                              Both orders, in order                            #
#################################################################################

def test_every_pair_is_asked_in_both_orders_and_the_second_order_is_swapped_back(pairwise):
    with FakeJudge(sharp_judge) as fake:
        run_judge(pairwise, fake.url)
    conn = store.connect(pairwise)
    pairs = store.items(conn, "pairwise")
    assert len(fake.requests) == 2 * len(pairs)  # 5 pairs (one gold) × 2 orders
    rows = judge_rows(pairwise)
    assert len(rows) == 2 * len(pairs) * 3
    assert {r["winner"] for r in rows if not r["gold"]} == {"a"}  # the sharp run, whichever side it was sent on
    assert {r["winner"] for r in rows if r["gold"]} != {"blurred"}
    assert sorted(r["swapped"] for r in rows if r["question"] == "aesthetics") == [0] * len(pairs) + [1] * len(pairs)
    results = study.main(study.parse_args(["analyze", str(pairwise), "--out", str(pairwise / "out"),
                                           "--bootstrap", "200"]))
    for question in store.PAIRWISE_QUESTIONS:
        entry = results["judge"]["fake-vlm"][question]
        assert (entry["n"], entry["wins_a"], entry["ties"], entry["win_rate_a"]) == (4, 4, 0, 1.0)
        assert entry["order_agreement"] == 1.0 and entry["first_position_rate"] == 0.5
    assert results["gold"]["judges"]["fake-vlm"] == {"n": 1, "passed": 1, "pass_rate": 1.0}


def test_the_system_text_then_the_caption_then_the_first_images_parts_before_the_seconds(pairwise):
    with FakeJudge(sharp_judge) as fake:
        run_judge(pairwise, fake.url, "--prompt_variant", "published", "--max_side", "4096")
    conn = store.connect(pairwise)
    for request in fake.requests:
        system, user = request["messages"]
        assert system == {"role": "system", "content": TABLE_11_SYSTEM}
        assert user["content"][0]["type"] == "text" and [p["type"] for p in user["content"][1:]] == ["image_url"] * 2
    for item in store.items(conn, "pairwise"):
        files = [np.asarray(Image.open(pairwise / conn.execute("SELECT path FROM images WHERE id = ?",
                                                                (image,)).fetchone()[0]).convert("RGB"))
                 for image in (item["image_a"], item["image_b"])]
        orders = []
        for request in fake.requests:
            sent = sent_images(request)
            for order, (first, second) in enumerate((files, files[::-1])):
                if np.array_equal(sent[0], first) and np.array_equal(sent[1], second):
                    orders.append(order)
                    assert request["messages"][1]["content"][0]["text"] == TABLE_11_USER.replace("(prompt)",
                                                                                               item["prompt"])
        assert sorted(orders) == [0, 1]  # asked once with a's image first, once with b's (or its blur) first


def test_crops_are_native_pixels_at_the_same_place_in_both_images(pairwise):
    with FakeJudge(sharp_judge) as fake:
        run_judge(pairwise, fake.url, "--crops", "2", "--crop_size", "32", "--max_side", "48")
    request = fake.requests[0]
    images = sent_images(request)
    assert len(images) == 6 and max(images[0].shape[:2]) == 48 and max(images[3].shape[:2]) == 48
    conn = store.connect(pairwise)
    text = request["messages"][1]["content"][0]["text"]
    item = next(i for i in store.items(conn, "pairwise") if text.startswith(judge.USER_PROMPT.replace(
        "(prompt)", i["prompt"])))
    originals = {}
    for image in (item["image_a"], item["image_b"]):
        path = pairwise / conn.execute("SELECT path FROM images WHERE id = ?", (image,)).fetchone()[0]
        originals[image] = np.asarray(Image.open(path).convert("RGB"))

    def place(crop, full):
        return [(y, x) for y in range(full.shape[0] - 31) for x in range(full.shape[1] - 31)
                if np.array_equal(full[y:y + 32, x:x + 32], crop)]

    first, second = list(originals.values())
    for k in (1, 2):  # crop k of the first image and crop k of the second: one place
        where = place(images[k], first) or place(images[k], second)
        assert where and (where == place(images[3 + k], first) or where == place(images[3 + k], second))


#################################################################################
#                              Faults and resuming                              #
#################################################################################

def test_timeouts_429_and_500_are_retried_with_backoff_then_answered(pairwise):
    soon = {"retry-after-ms": "10"}  # the openai client waits what the server asks (else 0.5 s, doubling)
    faults = {1: (429, {"error": {"message": "slow down"}}, 0, soon), 2: (500, {"error": {"message": "oops"}}, 0, soon),
              3: (503, b"<html>busy</html>", 0, soon),
              4: (200, completion(answer_text(True)), 3.0, {})}  # 3 s: past the 2 s timeout

    def behave(request, n):
        return faults.get(n) or sharp_judge(request, n)

    with FakeJudge(behave) as fake:
        run_judge(pairwise, fake.url, "--workers", "1")
    rows = judge_rows(pairwise)
    assert len(rows) == 2 * 5 * 3 and {r["winner"] for r in rows if not r["gold"]} == {"a"}  # the late "first"
    assert len(fake.requests) == 2 * 5 + 4  # answer to request 4 came after the timeout: never stored
    assert store.judge_errors(store.connect(pairwise)) == []


@pytest.mark.parametrize("reply, error", [
    (lambda: completion(None, refusal="I can't compare these images."), "no verdict"),
    (lambda: completion("I'm sorry, I can't help with that."), "no verdict"),
    (lambda: completion("1. Visual Aesthetics: (the first image is better) or (the second image is better)."),
     "both images named better"),
    (lambda: {"choices": []}, "without a message"),
    (lambda: b"this is not JSON", "JSONDecodeError"),
], ids=["refusal", "sorry", "template", "no-choices", "not-json"])
def test_refusals_and_malformed_answers_are_asked_again_at_temperature_0_then_stored_as_errors(pairwise, reply,
                                                                                               error):
    with FakeJudge(lambda request, n: (200, reply(), 0, {})) as fake:
        run_judge(pairwise, fake.url, "--temperature", "0.7")
    conn = store.connect(pairwise)
    assert judge_rows(pairwise) == []  # never a vote
    errors = store.judge_errors(conn)
    assert len(errors) == 10 and all(error in e["error"] for e in errors)
    parsed = "no verdict" in error or "both" in error
    assert len(fake.requests) == 10 * (2 if parsed else 1)
    if parsed:  # the first ask at the given temperature, the retry at 0; both raw texts kept
        assert sorted(r.get("temperature") for r in fake.requests) == [0.0] * 10 + [0.7] * 10
        assert all(e["raw"].count("asked again at temperature 0") == 1 for e in errors)


def test_retries_run_out_into_a_stored_error_and_a_rerun_asks_only_what_is_missing(pairwise):
    def behave(request, n):  # the first pair's first order fails every time on the first run
        text = request["messages"][1]["content"][0]["text"]
        return (500, {"error": {"message": "down"}}, 0, {"retry-after-ms": "10"}) if "astronaut" in text or "<img" in text else \
            sharp_judge(request, n)

    with FakeJudge(behave) as fake:
        run_judge(pairwise, fake.url, "--retries", "2", "--workers", "1")
    errors = store.judge_errors(store.connect(pairwise))
    assert len(errors) == 2 and all("InternalServerError after 3 tries" in e["error"] for e in errors)
    assert len(judge_rows(pairwise)) == 8 * 3
    with FakeJudge(sharp_judge) as again:
        run_judge(pairwise, again.url)
    assert len(again.requests) == 2  # only the two failed asks
    assert len(judge_rows(pairwise)) == 10 * 3
    with FakeJudge(sharp_judge) as third:
        run_judge(pairwise, third.url)
    assert third.requests == []


def test_a_refused_key_stops_the_run_with_a_usage_error_naming_the_variable(pairwise):
    with FakeJudge(lambda request, n: (401, {"error": {"message": "bad key"}}, 0, {})) as fake:
        with pytest.raises(UsageError, match="OPENAI_API_KEY"):
            run_judge(pairwise, fake.url)


def test_a_study_without_prompts_cannot_be_judged_with_table_11(tmp_path):
    from human_eval import design
    from study_helpers import make_runs

    folders = make_runs(tmp_path / "runs", prompts=False)
    design.create_pairwise(tmp_path / "s", folders, ["a", "b"], ["aesthetics", "fine_details"])
    with pytest.raises(UsageError, match="no prompts"):
        run_judge(tmp_path / "s", "http://127.0.0.1:9/v1")
