"""The rater's page and the JSON API (study.py serve): a thin FastAPI layer over store.py's plain functions.

    GET  /?token=T          the page (human_eval/page.html)
    GET  /api/next          {"task": {...} | null, "progress": {"done", "total"}, "prefetch": [url, ...]}
    POST /api/answer        {"task": id, "answers": {...}} -> 200 {"ok": true} once committed
    GET  /img/<id>?token=T  an image, by an opaque id valid for that rater only

Every request carries the rater's token (`Authorization: Bearer T`; `?token=T` also on the page and image URLs), else
401. Answers are committed by one writer thread in groups: a POST waits for the commit that holds its answer (one
fsync serves every answer that arrived meanwhile) and is acknowledged only after it. An image is served only from the
path stored at creation and only if its bytes still hash to what was checked then.
"""
import asyncio
import base64
import hashlib
import json
import queue
import re
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from human_eval import store

MAX_BODY = 64 * 1024  # bytes of a POST body
MAX_BATCH = 256  # answers committed together at most
PAGE = Path(__file__).with_name("page.html")
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
NO_STORE = {**HEADERS, "Cache-Control": "no-store"}


#################################################################################
#                                The answer writer                              #
#################################################################################

class AnswerWriter:
    """One thread owns the write connection: POSTs queue (rater, task, answers) and get a Future that resolves after
    the COMMIT holding their answer (True: stored, False: the same answer was already there) or fails with an
    AnswerError (4xx: nothing stored; 503: the commit failed, nothing stored)."""

    def __init__(self, study, meta, busy_timeout=store.BUSY_TIMEOUT_S):
        self.study, self.meta, self.busy_timeout = study, meta, busy_timeout
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="answer-writer", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """Commit what is queued, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def submit(self, rater, task, answers):
        future = Future()
        self.queue.put((rater, task, answers, future))
        return future

    def run(self):
        conn = store.connect(self.study, self.busy_timeout)
        try:
            while True:
                batch = [self.queue.get()]
                while batch[-1] is not None and len(batch) < MAX_BATCH:
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                stop = batch[-1] is None
                if stop:
                    batch.pop()
                if batch:
                    self.commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def commit(self, conn, batch):
        """Record every answer of the batch in one transaction (each in a savepoint, so a refused one leaves no
        trace), commit, and only then resolve the futures."""
        results = []
        try:
            with store.transaction(conn):
                for rater, task, answers, _ in batch:
                    conn.execute("SAVEPOINT answer")
                    try:
                        results.append(store.record_answer(conn, rater, task, answers, self.meta))
                    except store.AnswerError as error:
                        conn.execute("ROLLBACK TO answer")
                        results.append(error)
                    conn.execute("RELEASE answer")
        except Exception as error:  # the commit (or the database) failed: nothing of the batch is stored
            for *_, future in batch:
                future.set_exception(store.AnswerError(503, f"not saved ({type(error).__name__}: {error}); send the "
                                                            f"answer again"))
            return
        for (*_, future), result in zip(batch, results):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class Readers:
    """A read connection per thread (WAL readers never wait for the writer)."""

    def __init__(self, study):
        self.study, self.local = study, threading.local()

    def conn(self):
        if getattr(self.local, "conn", None) is None:
            self.local.conn = store.connect(self.study)
        return self.local.conn


#################################################################################
#                                    Requests                                   #
#################################################################################

def page_and_policy():
    """The page's HTML and a Content-Security-Policy allowing only its own inline script and style (by hash)."""
    html = PAGE.read_text(encoding="utf-8")

    def digest(tag):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() + "'"

    policy = (f"default-src 'none'; img-src 'self'; connect-src 'self'; script-src {digest('script')}; "
              f"style-src {digest('style')}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


def bearer_token(request, in_query):
    """The token of `Authorization: Bearer T`, else (page and images) of `?token=T`."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query_params.get("token") if in_query else None


async def read_body(request):
    """The body, at most MAX_BODY bytes (413 beyond, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
    return bytes(body)


def parse_answer(body):
    """(task, answers) of a POST body; HTTPException 400 when it is not {"task": ..., "answers": {...}} JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not a JSON value")

    try:
        data = json.loads(body, parse_constant=refuse)
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise HTTPException(400, f"the body is not JSON ({str(error)[:80]})") from None
    except RecursionError:
        raise HTTPException(400, "the body is not JSON we take (nested too deeply)") from None
    if not isinstance(data, dict) or set(data) != {"task", "answers"}:
        raise HTTPException(400, 'the body must be {"task": <id>, "answers": {<question>: <value>, ...}}')
    return data["task"], data["answers"]


def create_app(study, busy_timeout=store.BUSY_TIMEOUT_S):
    """The FastAPI app serving STUDY (its state: the study's database; nothing held here but connections)."""
    conn = store.connect(study)
    meta = store.read_meta(conn)
    conn.close()
    page, policy = page_and_policy()
    readers, writer = Readers(study), AnswerWriter(study, meta, busy_timeout)

    @asynccontextmanager
    async def lifespan(app):
        writer.start()
        yield
        writer.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request, error):  # every refusal (401, 404, 413, ...) as {"ok": false, "error": message}
        return JSONResponse({"ok": False, "error": str(error.detail)}, status_code=error.status_code, headers=NO_STORE)

    def rater_of(request, in_query=False):
        rater = store.rater_for_token(readers.conn(), bearer_token(request, in_query))
        if rater is None:
            raise HTTPException(401, "a valid token is needed: open the link you were given (/?token=...), or send "
                                     "Authorization: Bearer <token>")
        return rater

    @app.get("/")
    def rater_page(request: Request):
        rater_of(request, in_query=True)
        return HTMLResponse(page, headers={**NO_STORE, "Content-Security-Policy": policy})

    @app.get("/api/next")
    def next_task(request: Request):
        return JSONResponse(store.next_task(readers.conn(), rater_of(request), meta), headers=NO_STORE)

    @app.post("/api/answer")
    async def answer(request: Request):
        rater = rater_of(request)
        task, answers = parse_answer(await read_body(request))
        try:
            stored = await asyncio.wrap_future(writer.submit(rater, task, answers))
        except store.AnswerError as error:
            return JSONResponse({"ok": False, "error": str(error)}, status_code=error.status, headers=NO_STORE)
        return JSONResponse({"ok": True, "duplicate": not stored}, headers=NO_STORE)

    @app.get("/img/{image_id}")
    def image(image_id: str, request: Request):
        row = store.image_for(readers.conn(), rater_of(request, in_query=True), image_id)
        data = None if row is None else store.read_image(study, row)
        if data is None:
            raise HTTPException(404, "no such image")
        return Response(data, media_type=row["media_type"],
                        headers={**HEADERS, "Cache-Control": "private, max-age=86400, immutable"})

    return app


def serve(study, host="127.0.0.1", port=8000):
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(study), host=host, port=port, log_level="warning", access_log=False)
