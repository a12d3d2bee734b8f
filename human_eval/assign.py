"""Who sees what: each rater's tasks (the order, the sides, the repeats; seeded) and the judge's two orders of every
pair (PROTOCOL.md §12)."""
import secrets

import numpy as np

from human_eval import store


def rater_tasks(item_rows, meta, index):
    """The tasks of the index-th rater, in the order shown: [(item id, swapped, index of the task repeated or None)].

    Every item once (or `tasks_per_rater` of them, dealt in turn so that the items get raters evenly), gold items
    always; the order shuffled; left/right balanced (half of the pairs each way, seeded); `repeat` × the items shown
    again later with the sides swapped."""
    rng = np.random.default_rng([meta["seed"], index])
    base = [row["id"] for row in item_rows if not row["gold"]]
    gold = [row["id"] for row in item_rows if row["gold"]]
    if meta.get("tasks_per_rater") and meta["tasks_per_rater"] < len(base):
        dealt = np.random.default_rng(meta["seed"]).permutation(len(base))
        n = meta["tasks_per_rater"]
        base = [base[dealt[(index * n + j) % len(base)]] for j in range(n)]
    shown = [int(i) for i in rng.permutation(base + gold)]
    pairwise = meta["kind"] == "pairwise"
    sides = rng.permutation(np.arange(len(shown)) % 2) if pairwise else np.zeros(len(shown), dtype=int)
    tasks = [{"item": item, "swapped": int(s), "of": None} for item, s in zip(shown, sides)]
    candidates = [t for t in tasks if t["item"] not in gold]
    for k in rng.choice(len(candidates), round(meta.get("repeat", 0.0) * len(candidates)), replace=False):
        first = candidates[int(k)]
        again = {"item": first["item"], "swapped": 1 - first["swapped"] if pairwise else 0, "of": first}
        tasks.insert(int(rng.integers(tasks.index(first) + 1, len(tasks) + 1)), again)
    where = {id(t): i for i, t in enumerate(tasks)}
    return [(t["item"], t["swapped"], None if t["of"] is None else where[id(t["of"])]) for t in tasks]


def add_raters(conn, count):
    """Add `count` people to the study, each with a secret token and their tasks; [(rater id, token)]."""
    meta = store.read_meta(conn)
    item_rows = store.items(conn)
    added = []
    with store.transaction(conn):
        start = len(store.raters(conn))
        for index in range(start, start + count):
            rater, token = f"r{index + 1:03d}", secrets.token_urlsafe(24)
            store.add_rater(conn, rater, token)
            store.add_tasks(conn, rater, rater_tasks(item_rows, meta, index))
            added.append((rater, token))
    return added


def judge_tasks(conn, model):
    """The judge's rater (judge:<model>) with two tasks per pair, one in each order (made on its first run); the ids
    of its tasks without an answer."""
    rater = store.JUDGE_PREFIX + model
    with store.transaction(conn):
        if rater not in dict(store.raters(conn, judges=True)):
            store.add_rater(conn, rater)
            store.add_tasks(conn, rater, [(row["id"], swapped, None) for row in store.items(conn, "pairwise")
                                          for swapped in (0, 1)])
    return [row[0] for row in conn.execute(
        "SELECT t.id FROM tasks t WHERE t.rater = ? AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.task = t.id) "
        "ORDER BY t.position", (rater,))]
