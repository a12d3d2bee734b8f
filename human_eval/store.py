"""The study's whole state in one SQLite file (STUDY/study.sqlite: WAL, synchronous=FULL) and every read and write of
it as a plain function: the CLI, the server, the judge and the analysis all go through these.

A task is one item (a pair of images, or a patch) shown to one rater: the same pair shown to two raters is two
tasks, each with its own left/right order (`swapped`: the second image of the item is shown on the left, or sent
first to a judge). An answer is stored as posted (`left`/`right`, or the rating) and turned into a winner only here
(`answer_rows`), the one place that undoes the swap.
"""
import datetime
import hashlib
import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from errors import UsageError

DB_NAME = "study.sqlite"
BUSY_TIMEOUT_S = 10.0  # how long a writer waits for the database's write lock before giving up
JUDGE_PREFIX = "judge:"  # a judge's answers are stored as rater judge:<model>
SIDES = ("left", "right")
RATING_QUESTION = "rating"
RATINGS = range(1, 11)
# Table 11's three questions as a person reads them (PROTOCOL.md §12); the keys are the export's `question` values.
PAIRWISE_QUESTIONS = {
    "aesthetics": "Visual aesthetics: which image is of higher quality and aesthetically more pleasing?",
    "prompt_adherence": "Prompt adherence: which image is more representative of the prompt and follows it faithfully?",
    "fine_details": "Fine details: which image shows the fine visual details more accurately? Look at clarity, "
                    "sharpness and texture: edges, patterns, nuances of colour.",
}
RATING_TEXT = "Visual detail of this patch, from 1 (none: flat or blurred) to 10 (rich, sharp detail)."

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,           -- absolute, or relative to the study folder for files the study made
    sha256 TEXT NOT NULL,         -- of the file's bytes at creation: the server sends nothing else
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    label TEXT NOT NULL           -- the folder's label, or 'blurred' for a gold item's copy
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('pairwise', 'patch')),
    name TEXT NOT NULL,           -- the file name pairing the images (a patch: its own file name)
    prompt TEXT,
    image_a INTEGER NOT NULL REFERENCES images(id),  -- pairwise: the first label's image (gold: the original)
    image_b INTEGER REFERENCES images(id),           -- pairwise: the second label's image (gold: its blurred copy)
    gold INTEGER NOT NULL DEFAULT 0,
    source TEXT, x INTEGER, y INTEGER,               -- a patch: the image it was cut from, its top-left corner
    glcm_score REAL, raw_bytes INTEGER, compressed_bytes INTEGER  -- a patch: detail_metrics, as eval.py
);
CREATE TABLE raters (
    id TEXT PRIMARY KEY,
    token TEXT UNIQUE,            -- NULL for a judge
    created_at REAL NOT NULL
);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    rater TEXT NOT NULL REFERENCES raters(id),
    item INTEGER NOT NULL REFERENCES items(id),
    position INTEGER NOT NULL,    -- the order the rater sees them in
    swapped INTEGER NOT NULL,     -- 1: image_b on the left (a judge: sent first)
    repeat_of INTEGER REFERENCES tasks(id),
    UNIQUE (rater, position)
);
CREATE TABLE rater_images (       -- opaque image ids, each valid for one rater only
    id TEXT PRIMARY KEY,
    rater TEXT NOT NULL REFERENCES raters(id),
    image INTEGER NOT NULL REFERENCES images(id),
    UNIQUE (rater, image)
);
CREATE TABLE answers (
    task INTEGER NOT NULL REFERENCES tasks(id),
    question TEXT NOT NULL,
    answer TEXT NOT NULL,         -- as posted: left / right, or the rating
    submitted_at REAL NOT NULL,
    PRIMARY KEY (task, question)
);
CREATE TABLE judge_errors (       -- a judge's failed tasks, with the raw text: never votes
    id INTEGER PRIMARY KEY,
    task INTEGER NOT NULL REFERENCES tasks(id),
    error TEXT NOT NULL,
    raw TEXT,
    at REAL NOT NULL
);
"""


class AnswerError(ValueError):
    """An answer the study cannot take: `status` is the HTTP status the server answers with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


#################################################################################
#                                  Connections                                  #
#################################################################################

def configure(conn):
    """WAL, synchronous=FULL (a commit is on disk before it returns), foreign keys, rows as sqlite3.Row."""
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def connect(study, timeout=BUSY_TIMEOUT_S):
    """A connection to STUDY/study.sqlite (autocommit; write through `transaction`); UsageError when there is none."""
    path = Path(study) / DB_NAME
    if not path.is_file():
        raise UsageError(f"{study}: no {DB_NAME} there; make a study with `python study.py create ... --out {study}`")
    return configure(sqlite3.connect(path, timeout=timeout, isolation_level=None))


def create_database(path):
    """A new database file at `path` with the schema (the caller renames it into place when it is complete)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


@contextmanager
def transaction(conn):
    """BEGIN IMMEDIATE ... COMMIT; anything raised inside (or by the commit) rolls everything back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def write_meta(conn, meta):
    """Store the study's settings (JSON values)."""
    conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])


def read_meta(conn):
    """The study's settings: kind, labels, questions, seed, gold and repeat shares, ..."""
    return {row["key"]: json.loads(row["value"]) for row in conn.execute("SELECT key, value FROM meta")}


def questions_of(kind, meta):
    """The question ids a task of `kind` asks."""
    return list(meta["questions"]) if kind == "pairwise" else [RATING_QUESTION]


#################################################################################
#                         Building a study (design.py)                          #
#################################################################################

def add_image(conn, path, sha256, nbytes, width, height, media_type, label):
    """Insert an image; its id."""
    return conn.execute("INSERT INTO images (path, sha256, bytes, width, height, media_type, label) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (str(path), sha256, nbytes, width, height, media_type, label)).lastrowid


def add_item(conn, kind, name, prompt, image_a, image_b=None, gold=False, **patch):
    """Insert an item (patch: source, x, y, glcm_score, raw_bytes, compressed_bytes); its id."""
    columns = ["kind", "name", "prompt", "image_a", "image_b", "gold", *patch]
    values = [kind, name, prompt, image_a, image_b, int(gold), *patch.values()]
    return conn.execute(f"INSERT INTO items ({', '.join(columns)}) VALUES ({', '.join('?' * len(values))})",
                        values).lastrowid


def items(conn, kind=None):
    """Every item (of `kind`), by id, with `label`: its first image's label (a patch's folder)."""
    query = "SELECT items.*, images.label FROM items JOIN images ON images.id = items.image_a"
    if kind is None:
        return conn.execute(f"{query} ORDER BY items.id").fetchall()
    return conn.execute(f"{query} WHERE items.kind = ? ORDER BY items.id", (kind,)).fetchall()


def add_rater(conn, rater, token=None):
    """Insert a rater (a judge has no token)."""
    conn.execute("INSERT INTO raters (id, token, created_at) VALUES (?, ?, ?)", (rater, token, time.time()))


def raters(conn, judges=False):
    """[(rater id, token)] of the people (or of the judges), in the order they were added."""
    where = "token IS NULL" if judges else "token IS NOT NULL"
    return [(r["id"], r["token"]) for r in conn.execute(f"SELECT id, token FROM raters WHERE {where} ORDER BY rowid")]


def add_tasks(conn, rater, tasks):
    """Insert a rater's tasks in the order shown: [(item id, swapped, index of the task it repeats or None)]; give
    every image of them an opaque id for this rater. Returns the task ids."""
    start = conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM tasks WHERE rater = ?", (rater,)).fetchone()[0]
    ids = []
    for position, (item, swapped, repeat_of) in enumerate(tasks, start):
        ids.append(conn.execute("INSERT INTO tasks (rater, item, position, swapped, repeat_of) VALUES (?, ?, ?, ?, ?)",
                                (rater, item, position, int(swapped),
                                 None if repeat_of is None else ids[repeat_of])).lastrowid)
    images = {row[0] for row in conn.execute(
        "SELECT i.image_a FROM tasks t JOIN items i ON i.id = t.item WHERE t.rater = ? UNION "
        "SELECT i.image_b FROM tasks t JOIN items i ON i.id = t.item WHERE t.rater = ? AND i.image_b IS NOT NULL",
        (rater, rater))}
    conn.executemany("INSERT OR IGNORE INTO rater_images (id, rater, image) VALUES (?, ?, ?)",
                     [(secrets.token_urlsafe(16), rater, image) for image in sorted(images)])
    return ids


#################################################################################
#                              What a rater is shown                            #
#################################################################################

def rater_for_token(conn, token):
    """The person's rater id for a token, or None (judges have no token)."""
    if not token:
        return None
    row = conn.execute("SELECT id FROM raters WHERE token = ?", (token,)).fetchone()
    return row["id"] if row else None


def task_sides(conn, task_id):
    """(task row, item row, [left image id, right image id] or [patch image id]): the images in the order shown."""
    task = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if task is None:
        return None, None, []
    item = conn.execute("SELECT * FROM items WHERE id = ?", (task["item"],)).fetchone()
    if item["kind"] == "patch":
        return task, item, [item["image_a"]]
    shown = [item["image_a"], item["image_b"]]
    return task, item, shown[::-1] if task["swapped"] else shown


def task_json(conn, task_id, meta):
    """A task as /api/next gives it: {"id", "kind", "prompt", "images": [url, ...], "questions", "question_text"}."""
    task, item, shown = task_sides(conn, task_id)
    urls = ["img/" + conn.execute("SELECT id FROM rater_images WHERE rater = ? AND image = ?",
                                  (task["rater"], image)).fetchone()[0] for image in shown]
    questions = questions_of(item["kind"], meta)
    text = PAIRWISE_QUESTIONS if item["kind"] == "pairwise" else {RATING_QUESTION: RATING_TEXT}
    return {"id": task["id"], "kind": item["kind"], "prompt": item["prompt"], "images": urls,
            "questions": questions, "question_text": {q: text[q] for q in questions}}


def next_task(conn, rater, meta):
    """/api/next's answer: {"task": the rater's first unanswered task or None, "progress": {"done", "total"},
    "prefetch": the image urls of the task after it}."""
    open_tasks = [row["id"] for row in conn.execute(
        "SELECT t.id FROM tasks t WHERE t.rater = ? AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.task = t.id) "
        "ORDER BY t.position LIMIT 2", (rater,))]
    total, done = conn.execute("SELECT COUNT(*), COALESCE(SUM(EXISTS (SELECT 1 FROM answers a WHERE a.task = t.id)), "
                               "0) FROM tasks t WHERE t.rater = ?", (rater,)).fetchone()
    return {"task": task_json(conn, open_tasks[0], meta) if open_tasks else None,
            "progress": {"done": done, "total": total},
            "prefetch": task_json(conn, open_tasks[1], meta)["images"] if len(open_tasks) > 1 else []}


def read_image(study, row):
    """The bytes of an image row's file as checked at creation, or None (gone, unreadable, or no longer the same
    bytes: a file replaced, e.g. by a symlink to something else)."""
    try:
        data = (Path(study) / row["path"]).read_bytes()
    except OSError:
        return None
    return data if len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"] else None


def image_for(conn, rater, public_id):
    """The image row behind an opaque id, only for the rater it was given to; None otherwise."""
    return conn.execute("SELECT images.* FROM rater_images JOIN images ON images.id = rater_images.image "
                        "WHERE rater_images.id = ? AND rater_images.rater = ?", (public_id, rater)).fetchone()


#################################################################################
#                                    Answers                                    #
#################################################################################

def is_integer(value):
    """A JSON integer (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_answers(answers, questions, kind):
    """{question: value as stored} of a posted answers object; AnswerError 400 naming what is wrong."""
    if not isinstance(answers, dict):
        raise AnswerError(400, '"answers" must be an object {question: value}')
    missing, unknown = [q for q in questions if q not in answers], [q for q in answers if q not in questions]
    if missing or unknown:
        parts = [f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else ""]
        raise AnswerError(400, f"this task asks {questions}: " + "; ".join(part for part in parts if part))
    if kind == "patch":
        rating = answers[RATING_QUESTION]
        if not is_integer(rating) or rating not in RATINGS:
            raise AnswerError(400, f'"rating" must be an integer from 1 to 10, got {json.dumps(rating)[:40]}')
        return {RATING_QUESTION: str(rating)}
    for question in questions:
        if answers[question] not in SIDES:
            raise AnswerError(400, f'"{question}" must be "left" or "right", got {json.dumps(answers[question])[:40]}')
    return {q: answers[q] for q in questions}


def record_answer(conn, rater, task_id, answers, meta, now=None):
    """Store a rater's answers to one task, inside the caller's transaction. True: stored; False: the same answers
    were already there (nothing new stored). AnswerError: another rater's or an unknown task (404), a bad value
    (400), different answers to an answered task (409); nothing is stored then."""
    if not is_integer(task_id) or not 0 < task_id < 2 ** 63:
        raise AnswerError(400, '"task" must be the integer id /api/next gave')
    row = conn.execute("SELECT t.id, i.kind FROM tasks t JOIN items i ON i.id = t.item WHERE t.id = ? AND t.rater = ?",
                       (task_id, rater)).fetchone()
    if row is None:
        raise AnswerError(404, f"no task {task_id} for this rater")
    values = check_answers(answers, questions_of(row["kind"], meta), row["kind"])
    stored = {r["question"]: r["answer"] for r in conn.execute("SELECT question, answer FROM answers WHERE task = ?",
                                                                (task_id,))}
    if stored:
        if stored == values:
            return False
        raise AnswerError(409, f"task {task_id} was already answered ({stored}); answers are final")
    now = time.time() if now is None else now
    conn.executemany("INSERT INTO answers (task, question, answer, submitted_at) VALUES (?, ?, ?, ?)",
                     [(task_id, q, v, now) for q, v in values.items()])
    return True


def record_judge_error(conn, task_id, error, raw):
    """Keep a judge's failure on a task, with the raw text it answered (never a vote)."""
    conn.execute("INSERT INTO judge_errors (task, error, raw, at) VALUES (?, ?, ?, ?)", (task_id, error, raw,
                                                                                         time.time()))


#################################################################################
#                                    Export                                     #
#################################################################################

EXPORT_COLUMNS = ("rater", "task", "kind", "item", "question", "answer", "label_left", "label_right", "winner",
                  "rating", "image_left", "image_right", "prompt", "swapped", "gold", "gold_answer", "repeat_of",
                  "patch_source", "patch_x", "patch_y", "submitted_at")

ANSWER_QUERY = """
SELECT a.task, a.question, a.answer, a.submitted_at, t.rater, t.swapped, t.repeat_of, t.item, i.kind, i.prompt,
       i.gold, i.source, i.x, i.y, ia.path AS path_a, ia.label AS label_a, ib.path AS path_b, ib.label AS label_b
FROM answers a JOIN tasks t ON t.id = a.task JOIN items i ON i.id = t.item JOIN images ia ON ia.id = i.image_a
LEFT JOIN images ib ON ib.id = i.image_b
ORDER BY a.task, a.question
"""


def iso_time(seconds):
    """UTC ISO 8601 with milliseconds."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def answer_rows(conn):
    """One dict per answer to one question (EXPORT_COLUMNS), with the swap undone: `winner` is the label of the
    image shown on the chosen side; `gold_answer` the side of a gold item's original."""
    rows = []
    for r in conn.execute(ANSWER_QUERY):
        row = dict.fromkeys(EXPORT_COLUMNS, "")
        row.update(rater=r["rater"], task=r["task"], kind=r["kind"], item=r["item"], question=r["question"],
                   answer=r["answer"], prompt=r["prompt"] or "", swapped=r["swapped"], gold=r["gold"],
                   repeat_of=r["repeat_of"] or "", submitted_at=iso_time(r["submitted_at"]))
        if r["kind"] == "patch":
            row.update(label_left=r["label_a"], image_left=r["path_a"], rating=int(r["answer"]),
                       patch_source=r["source"], patch_x=r["x"], patch_y=r["y"])
        else:
            left, right = (("b", "a") if r["swapped"] else ("a", "b"))
            row.update(label_left=r[f"label_{left}"], label_right=r[f"label_{right}"], image_left=r[f"path_{left}"],
                       image_right=r[f"path_{right}"])
            row["winner"] = row["label_left"] if r["answer"] == "left" else row["label_right"]
            if r["gold"]:
                row["gold_answer"] = "right" if r["swapped"] else "left"
        rows.append(row)
    return rows


def judge_errors(conn):
    """[{"rater", "task", "error", "raw", "at"}] of every stored judge failure."""
    query = "SELECT e.*, t.rater FROM judge_errors e JOIN tasks t ON t.id = e.task ORDER BY e.id"
    return [{"rater": r["rater"], "task": r["task"], "error": r["error"], "raw": r["raw"], "at": iso_time(r["at"])}
            for r in conn.execute(query)]
