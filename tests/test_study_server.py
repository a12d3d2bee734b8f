"""The study server's contract (human_eval/server.py): tokens and 401s, opaque per-rater image ids, tasks of one rater,
an answer acknowledged only once committed and stored once, 4xx with nothing stored for bad input, the 64 KB limit,
no file reachable by any URL; and under load: 16 raters at once, then kill -9 and a restart (loopback only)."""
import os
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from human_eval import assign, design, server, store
from study_helpers import ThreadServer, answer_everything, free_port, make_study, start_serve_process

SIDES = ["left", "right"]


@pytest.fixture
def pairwise(tmp_path):
    """(study, [(rater, token)] × 2): 4 pairs + 1 gold, a quarter repeated."""
    return make_study(tmp_path, n=4, raters=2, gold=0.25, repeat=0.25)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def stored_answers(study):
    conn = store.connect(study)
    return {(r["task"], r["question"]): r["answer"] for r in store.answer_rows(conn)}


#################################################################################
#                                  The contract                                 #
#################################################################################

def test_every_url_needs_a_known_token_and_the_api_takes_it_only_as_a_bearer_header(pairwise):
    study, [(_, token), _] = pairwise
    with TestClient(server.create_app(study)) as client:
        image = client.get("/api/next", headers=bearer(token)).json()["task"]["images"][0]
        for method, url in (("GET", "/"), ("GET", "/api/next"), ("POST", "/api/answer"), ("GET", image)):
            for headers, params in (({}, {}), (bearer("not-a-token"), {}), ({}, {"token": "nope"}),
                                    ({"Authorization": f"Basic {token}"}, {})):
                response = client.request(method, url, headers=headers, params=params, json={})
                assert response.status_code == 401 and "token" in response.json()["error"], (url, headers, params)
        assert client.get("/", params={"token": token}).status_code == 200
        assert client.get(image, params={"token": token}).status_code == 200
        assert client.get("/api/next", params={"token": token}).status_code == 401  # the API: header only


def test_tasks_and_image_ids_belong_to_one_rater_and_images_are_the_files_bytes(pairwise):
    study, [(first_id, first), (second_id, second)] = pairwise
    conn = store.connect(study)
    with TestClient(server.create_app(study)) as client:
        mine = client.get("/api/next", headers=bearer(first)).json()["task"]
        assert set(mine) == {"id", "kind", "prompt", "images", "questions", "question_text"}
        assert mine["kind"] == "pairwise" and mine["questions"] == list(store.PAIRWISE_QUESTIONS)
        for url in mine["images"]:
            response = client.get(url, params={"token": first})
            row = conn.execute("SELECT images.* FROM rater_images JOIN images ON images.id = rater_images.image "
                               "WHERE rater_images.id = ?", (url.split("/")[1],)).fetchone()
            assert response.content == (study / row["path"]).read_bytes()
            assert response.headers["content-type"] == row["media_type"]
            assert client.get(url, params={"token": second}).status_code == 404  # another rater's id
    # The same pair shown to two raters is two tasks; each rater has their own id for the same image.
    tasks = conn.execute("SELECT rater, item, id FROM tasks WHERE repeat_of IS NULL").fetchall()
    by_item = {}
    for rater, item, task in tasks:
        by_item.setdefault(item, {})[rater] = task
    assert all(len(set(v.values())) == 2 for v in by_item.values()) and len(by_item) == 5
    ids = {rater: dict(conn.execute("SELECT image, id FROM rater_images WHERE rater = ?", (rater,)).fetchall())
           for rater in (first_id, second_id)}
    assert set(ids[first_id]) == set(ids[second_id])
    assert not set(ids[first_id].values()) & set(ids[second_id].values())


def test_an_answer_is_stored_once_and_the_same_post_again_stores_nothing_new(pairwise):
    study, [(_, token), _] = pairwise
    with TestClient(server.create_app(study)) as client:
        task = client.get("/api/next", headers=bearer(token)).json()["task"]
        body = {"task": task["id"], "answers": {q: "left" for q in task["questions"]}}
        assert client.post("/api/answer", headers=bearer(token), json=body).json() == {"ok": True, "duplicate": False}
        before = stored_answers(study)
        assert client.post("/api/answer", headers=bearer(token), json=body).json() == {"ok": True, "duplicate": True}
        changed = {"task": task["id"], "answers": {q: "right" for q in task["questions"]}}
        response = client.post("/api/answer", headers=bearer(token), json=changed)
        assert response.status_code == 409 and "already answered" in response.json()["error"]
        assert stored_answers(study) == before and len(before) == 3
        assert client.get("/api/next", headers=bearer(token)).json()["task"]["id"] != task["id"]


@pytest.mark.parametrize("body, status, message", [
    ({"task": "1", "answers": {}}, 400, "integer id"),
    ({"task": True, "answers": {}}, 400, "integer id"),
    ({"task": 2 ** 70, "answers": {}}, 400, "integer id"),
    ({"task": None, "answers": {"aesthetics": "left"}}, 400, "integer id"),
    ({"task": 0, "answers": {}}, 400, "integer id"),
    ({"task": "own", "answers": {"aesthetics": "up", "prompt_adherence": "left", "fine_details": "left"}}, 400,
     '"aesthetics" must be "left" or "right"'),
    ({"task": "own", "answers": {"aesthetics": "left", "fine_details": "left"}}, 400, "missing ['prompt_adherence']"),
    ({"task": "own", "answers": {"aesthetics": "left", "prompt_adherence": "left", "fine_details": "left",
                                 "rating": 5}}, 400, "unknown ['rating']"),
    ({"task": "own", "answers": ["left", "left", "left"]}, 400, "must be an object"),
    ({"task": "theirs", "answers": {"aesthetics": "left", "prompt_adherence": "left", "fine_details": "left"}},
     404, "no task"),
    ({"task": "own", "answers": {}, "extra": 1}, 400, "the body must be"),
    ([1, 2], 400, "the body must be"),
], ids=["string-id", "bool-id", "huge-id", "null-id", "zero-id", "bad-side", "missing", "unknown", "list",
        "other-rater", "extra-key", "not-an-object"])
def test_bad_answers_are_refused_with_a_message_and_nothing_is_stored(pairwise, body, status, message):
    study, [(_, token), (_, other)] = pairwise
    with TestClient(server.create_app(study)) as client:
        own = client.get("/api/next", headers=bearer(token)).json()["task"]["id"]
        theirs = client.get("/api/next", headers=bearer(other)).json()["task"]["id"]
        if isinstance(body, dict):
            body = {**body, "task": {"own": own, "theirs": theirs}.get(body["task"], body["task"])}
        response = client.post("/api/answer", headers=bearer(token), json=body)
        assert response.status_code == status and message in response.json()["error"], response.json()
        assert response.json()["ok"] is False
    assert stored_answers(study) == {}


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}", b'{"task": NaN, "answers": {}}', b"[" * 40000,
                                     b""], ids=["broken", "not-utf8", "nan", "deep", "empty"])
def test_a_body_that_is_not_json_is_a_400(pairwise, content):
    study, [(_, token), _] = pairwise
    with TestClient(server.create_app(study)) as client:
        response = client.post("/api/answer", headers=bearer(token), content=content)
        assert response.status_code == 400 and "not JSON" in response.json()["error"]
    assert stored_answers(study) == {}


def test_a_body_over_64_kb_is_refused_whatever_its_length_header_says(pairwise):
    study, [(_, token), _] = pairwise
    with TestClient(server.create_app(study)) as client:
        task = client.get("/api/next", headers=bearer(token)).json()["task"]
        padding = " " * (64 * 1024)
        body = f'{{"task": {task["id"]}, "answers": {{"aesthetics": "left"}}{padding}}}'.encode()
        assert client.post("/api/answer", headers=bearer(token), content=body).status_code == 413

        def chunks():  # no Content-Length: a chunked body, cut off at the limit
            yield body[:40000]
            yield body[40000:]

        assert client.post("/api/answer", headers=bearer(token), content=chunks()).status_code == 413
        fits = f'{{"task": {task["id"]}, "answers": {{"aesthetics": "left", "prompt_adherence": "left", ' \
               f'"fine_details": "left"}}{padding[:60000]}}}'.encode()
        assert client.post("/api/answer", headers=bearer(token), content=fits).status_code == 200


def test_a_patch_task_takes_an_integer_rating_from_1_to_10(tmp_path):
    from study_helpers import make_runs

    folders = make_runs(tmp_path / "runs", n=2, size=(160, 128))
    design.create_patches(tmp_path / "s", folders[:1], ["a"], 64, 2, workers=1)
    conn = store.connect(tmp_path / "s")
    [(_, token)] = assign.add_raters(conn, 1)
    with TestClient(server.create_app(tmp_path / "s")) as client:
        task = client.get("/api/next", headers=bearer(token)).json()["task"]
        assert task["kind"] == "patch" and task["questions"] == ["rating"] and len(task["images"]) == 1
        for bad in (0, 11, 7.5, "7", True, None):
            response = client.post("/api/answer", headers=bearer(token), json={"task": task["id"],
                                                                               "answers": {"rating": bad}})
            assert response.status_code == 400 and "1 to 10" in response.json()["error"]
        assert client.post("/api/answer", headers=bearer(token), json={"task": task["id"],
                                                                       "answers": {"rating": 10}}).status_code == 200
    [row] = store.answer_rows(conn)
    assert (row["task"], row["rating"], row["answer"], row["kind"]) == (task["id"], 10, "10", "patch")


def test_next_resumes_in_order_and_two_tabs_see_the_same_task(pairwise):
    study, [(rater, token), _] = pairwise
    conn = store.connect(study)
    order = [r["id"] for r in conn.execute("SELECT id FROM tasks WHERE rater = ? ORDER BY position", (rater,))]
    with TestClient(server.create_app(study)) as tab, TestClient(server.create_app(study)) as other_tab:
        for done, task_id in enumerate(order):
            now, also = (c.get("/api/next", headers=bearer(token)).json() for c in (tab, other_tab))
            assert now == also  # a second tab (or a reload) is at the same place
            assert now["task"]["id"] == task_id and now["progress"] == {"done": done, "total": len(order)}
            if done + 1 < len(order):  # the next task's images, to prefetch
                assert now["prefetch"] == store.next_task(conn, rater, store.read_meta(conn))["prefetch"]
                assert len(now["prefetch"]) == 2 and now["prefetch"] != now["task"]["images"]
            tab.post("/api/answer", headers=bearer(token),
                     json={"task": task_id, "answers": {q: SIDES[done % 2] for q in now["task"]["questions"]}})
        assert tab.get("/api/next", headers=bearer(token)).json()["task"] is None


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_script(pairwise):
    study, [(_, token), _] = pairwise
    with TestClient(server.create_app(study)) as client:
        response = client.get("/", params={"token": token})
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store" and response.headers["referrer-policy"] == "no-referrer"


#################################################################################
#                       Committed before acknowledged                          #
#################################################################################

def test_the_database_is_in_wal_mode_and_every_connection_commits_with_synchronous_full(pairwise):
    study, _ = pairwise
    conn = store.connect(study)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is on disk when it returns
    raw = sqlite3.connect(study / store.DB_NAME)  # WAL is the file's own mode, for any program that opens it
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def deny_commit(action, arg1, arg2, database, trigger):
    """A SQLite authorizer that refuses COMMIT: a commit that fails after the answers were written (as a full disk
    or an I/O error would)."""
    return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" else sqlite3.SQLITE_OK


def test_no_answer_is_acknowledged_before_its_commit_succeeds(pairwise):
    study, [(rater, token), (other, _)] = pairwise
    conn, meta = store.connect(study), store.read_meta(store.connect(study))
    tasks = [store.next_task(conn, r, meta)["task"] for r in (rater, other)]
    batch = [(r, t["id"], {q: "left" for q in t["questions"]}, Future()) for r, t in zip((rater, other), tasks)]
    writer = server.AnswerWriter(study, meta)
    failing = store.connect(study)
    failing.set_authorizer(deny_commit)
    writer.commit(failing, batch)
    for *_, future in batch:
        with pytest.raises(store.AnswerError) as refused:
            future.result(timeout=0)
        assert refused.value.status == 503 and "not saved" in str(refused.value)
    assert stored_answers(study) == {} and not failing.in_transaction
    failing.set_authorizer(None)
    batch = [(*entry[:3], Future()) for entry in batch] + [(rater, tasks[1]["id"], batch[1][2], Future())]
    writer.commit(failing, batch)
    assert [f.result(timeout=0) if not f.exception() else f.exception().status for *_, f in batch] == [True, True, 404]
    assert len(stored_answers(study)) == 6  # the other rater's task refused within the batch, the rest committed


def test_while_another_writer_holds_the_database_the_post_is_a_503_and_nothing_is_stored(pairwise):
    study, [(_, token), _] = pairwise
    blocker = store.connect(study)
    with ThreadServer(study, busy_timeout=0.3) as running, httpx.Client(base_url=running.url) as client:
        task = client.get("/api/next", headers=bearer(token)).json()["task"]
        body = {"task": task["id"], "answers": {q: "right" for q in task["questions"]}}
        blocker.execute("BEGIN IMMEDIATE")
        response = client.post("/api/answer", headers=bearer(token), json=body)
        assert response.status_code == 503 and "send the answer again" in response.json()["error"]
        blocker.execute("ROLLBACK")
        assert stored_answers(study) == {}
        assert client.post("/api/answer", headers=bearer(token), json=body).json()["ok"] is True
    assert len(stored_answers(study)) == 3


#################################################################################
#                                   Traversal                                   #
#################################################################################

def raw_get(url, target, token):
    """GET `target` exactly as written (no client-side normalisation); (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_no_url_reaches_a_file_by_traversal_absolute_path_nul_or_symlink(pairwise, tmp_path):
    study, [(_, token), _] = pairwise
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    (study / "evil.png").symlink_to(secret)
    gold = next((study / "gold").iterdir())  # the blurred copies' folder, named for the label blurred
    (gold / "link.png").symlink_to(study / "study.sqlite")
    with ThreadServer(study) as running:
        image = httpx.get(f"{running.url}/api/next", headers=bearer(token)).json()["task"]["images"][0]
        valid = image.split("/")[1]
        conn = store.connect(study)
        source = conn.execute("SELECT images.path FROM rater_images JOIN images ON images.id = rater_images.image "
                              "WHERE rater_images.id = ?", (valid,)).fetchone()[0]
        attacks = ["/study.sqlite", "/evil.png", f"/gold/{gold.name}/link.png", f"/gold/{gold.name}/00000.png",
                   "/../study.sqlite", "/%2e%2e/%2e%2e/etc/passwd",
                   "/..%2f..%2fetc%2fpasswd", "//etc/passwd", f"/{secret}", "/img/../study.sqlite",
                   "/img/..%2fstudy.sqlite", "/img/%2e%2e", "/img/%2e%2e%2fstudy.sqlite", "/img/..%5cstudy.sqlite",
                   "/img/%2Fetc%2Fpasswd", f"/img/{secret}", f"/img{source}", f"/img/{source}", "/img//etc/passwd",
                   "/img/evil.png", "/img/link.png", "/img/%00", f"/img/{valid}%00.png", f"/img/{valid}/..",
                   f"/img/{valid}/../../study.sqlite", "/img/file:%2F%2F%2Fetc%2Fpasswd", "/img/%252e%252e",
                   "/api/next/../../study.sqlite", "/api/next/%2e%2e%2fstudy.sqlite", "/api/answer/..%2f..%2fevil.png",
                   "/api/%2e%2e/study.sqlite", "/%00", "/img/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd"]
        forbidden = [b"TOP-SECRET", b"SQLite format 3", b"\x89PNG", b"root:"]
        for target in attacks:
            status, body = raw_get(running.url, target, token)
            assert status == 404 and not any(f in body for f in forbidden), (target, status, body[:80])
        assert raw_get(running.url, f"/img/{valid}", token)[0] == 200  # the real one is served
        # The image's file swapped for a symlink to another file: not the bytes checked at creation, a 404.
        path, original = Path(source), Path(source).read_bytes()
        path.unlink()
        path.symlink_to(secret)
        try:
            status, body = raw_get(running.url, f"/img/{valid}", token)
            assert status == 404 and b"TOP-SECRET" not in body
        finally:
            path.unlink()
            path.write_bytes(original)
        assert raw_get(running.url, f"/img/{valid}", token)[0] == 200


#################################################################################
#                                  Under load                                   #
#################################################################################

def rater_loop(url, token, acked, stop, double_every=5):
    """Answer until done or stopped; record (task, answers) of each 200. Every `double_every`-th answer is sent twice
    (a double click): both must be 200."""
    with httpx.Client(base_url=url, timeout=30) as client:
        sent = 0
        while not stop.is_set():
            try:
                task = client.get("/api/next", headers=bearer(token)).json()["task"]
                if task is None:
                    return
                answers = {q: SIDES[(task["id"] + k) % 2] for k, q in enumerate(task["questions"])}
                for _ in range(2 if sent % double_every == 0 else 1):
                    response = client.post("/api/answer", headers=bearer(token),
                                           json={"task": task["id"], "answers": answers})
                    if response.status_code == 200:
                        acked.append((task["id"], answers))
                sent += 1
            except httpx.TransportError:
                return  # the server is gone


def test_16_raters_at_once_every_acknowledged_answer_is_exported_exactly_once(tmp_path):
    study, tokens = make_study(tmp_path, n=8, raters=16, repeat=0.25)
    port = free_port()
    process = start_serve_process(study, port)
    acked, stop = [], threading.Event()
    try:
        threads = [threading.Thread(target=rater_loop, args=(f"http://127.0.0.1:{port}", t, acked, stop))
                   for _, t in tokens]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        stop.set()
        process.send_signal(signal.SIGINT)
        process.wait(30)
    rows = store.answer_rows(store.connect(study))
    exported = [(r["task"], r["question"], r["answer"]) for r in rows]
    assert len(exported) == len(set(exported))  # exactly once
    expected = {(task, q, a) for task, answers in acked for q, a in answers.items()}
    assert set(exported) == expected and len(expected) == 16 * 10 * 3  # 8 pairs + 2 repeats each, all answered


def test_kill_9_under_load_loses_no_acknowledged_answer_and_the_database_stays_whole(tmp_path):
    study, tokens = make_study(tmp_path, n=40, raters=16)
    port = free_port()
    process = start_serve_process(study, port)
    acked, stop = [], threading.Event()
    threads = [threading.Thread(target=rater_loop, args=(f"http://127.0.0.1:{port}", t, acked, stop))
               for _, t in tokens]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # mid-load: requests in flight
    process.wait(30)
    for thread in threads:
        thread.join(60)
    stop.set()
    assert len(acked) >= 150 and not any(thread.is_alive() for thread in threads)
    conn = sqlite3.connect(study / store.DB_NAME)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    restarted = start_serve_process(study, port)
    try:
        stored = stored_answers(study)
        for task, answers in acked:
            assert all(stored.get((task, q)) == a for q, a in answers.items()), task
        rater, token = tokens[0]
        before = store.connect(study).execute("SELECT COUNT(DISTINCT a.task) FROM answers a JOIN tasks t ON "
                                              "t.id = a.task WHERE t.rater = ?", (rater,)).fetchone()[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # a rater carries on where they were
            done = answer_everything(client, token, lambda t: {q: "left" for q in t["questions"]})
        assert before + len(done) == 40 and done
    finally:
        restarted.send_signal(signal.SIGINT)
        restarted.wait(30)
